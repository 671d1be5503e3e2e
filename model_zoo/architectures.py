"""Demo-scale architectures, registered in timm's registry so every caller uses ``timm.create_model``.

Stock timm VGGs carry a 4096-wide head sized for 224 px; at the demo world's 32 px that head dominates and trains
poorly in bounded CPU time. ``vgg_demo`` is the same timm ``VGG`` class (conv, BatchNorm, ReLU, max-pool, then
timm's ConvMlp head) with a narrow config whose last feature map (8x8 at 32 px) still fits the head's 7x7 kernel.

``preact_resnet18_cifar`` is the network of the catastrophic-overfitting papers (Wong et al.; Andriushchenko &
Flammarion; de Jorge et al.): a pre-activation ResNet-18 whose stem is one 3x3 stride-1 conv, so the first stage
sees all 32x32 pixels (timm's ``resnetv2_18`` stem divides the side by 4 first). It is timm's own ``ResNetV2`` with
that stem; ``width`` (64 in the papers) scales every stage.

``mnist_cnn`` is the small MNIST network of Wong et al.'s fast adversarial training (two 4x4 stride-2 convolutions
with 16 and 32 filters, a 100-unit hidden layer): the setting where their FGSM training was shown to work at
eps 0.3 and the later papers show it collapsing at larger eps. It averages the three RGB channels first, so on grey
digits it is the one-channel network and every attack's perturbation stays grey.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnetv2 import ResNetV2
from timm.models.vgg import VGG


def _cfg(**kwargs) -> dict:
    """The data config every small model here carries (32 px, 10 classes, ImageNet normalisation, no weights),
    with the model's own values over it."""
    return {**dict(url="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bicubic",
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, classifier="head.fc"), **kwargs}


default_cfgs = generate_default_cfgs(
    {
        "vgg_demo.untrained": _cfg(pool_size=(1, 1), first_conv="features.0"),
        "preact_resnet18_cifar.untrained": _cfg(pool_size=(4, 4), first_conv="stem.conv"),
        # pixels as they are (no normalisation), as in the fast-AT papers' MNIST code
        "mnist_cnn.untrained": _cfg(input_size=(3, 28, 28), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                    first_conv="conv1", classifier="fc2"),
    }
)


@register_model
def vgg_demo(pretrained: bool = False, **kwargs) -> VGG:
    """Narrow VGG-style surrogate for 32 px inputs: 32-M-64-M-128-128, ConvMlp head (mid width 256)."""
    kwargs.setdefault("num_classes", 10)
    return build_model_with_cfg(
        partial(VGG, cfg=[32, "M", 64, "M", 128, 128], mlp_ratio=0.0625, norm_layer=nn.BatchNorm2d),
        "vgg_demo",
        pretrained,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


class CifarPreActResNet(ResNetV2):
    """timm's ``ResNetV2`` (pre-activation basic blocks, stages of width x (1, 2, 4, 8)) with a 3x3 stride-1 stem.
    The stem is replaced in the constructor, so checkpoints load into the right shapes."""

    def __init__(self, width: int = 64, in_chans: int = 3, **kwargs):
        super().__init__(layers=[2, 2, 2, 2], channels=tuple(width * m for m in (1, 2, 4, 8)), in_chans=in_chans,
                         stem_chs=width, basic=True, bottle_ratio=1.0, conv_layer=create_conv2d,
                         norm_layer=BatchNormAct2d, **kwargs)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False))
        self.feature_info = [dict(f, reduction=max(1, f["reduction"] // 4)) for f in self.feature_info]  # no stem pooling


@register_model
def preact_resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarPreActResNet:
    """Pre-activation ResNet-18 for 32 px inputs (``width`` 64 in the CO papers)."""
    kwargs.setdefault("num_classes", 10)
    return build_model_with_cfg(CifarPreActResNet, "preact_resnet18_cifar", pretrained,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


class MnistCNN(nn.Module):
    """conv 16 (4x4, stride 2) - ReLU - conv 32 (4x4, stride 2) - ReLU - fc 100 - ReLU - fc, on the channel mean."""

    def __init__(self, num_classes: int = 10, img_size: int = 28, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, 16, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * (img_size // 4) ** 2, 100)
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.conv1(x.mean(1, keepdim=True)))
        x = nn.functional.relu(self.conv2(x))
        return self.fc2(nn.functional.relu(self.fc1(x.flatten(1))))


@register_model
def mnist_cnn(pretrained: bool = False, **kwargs) -> MnistCNN:
    """Wong et al.'s MNIST network (28 px; ``img_size`` sizes the hidden layer's input)."""
    kwargs.setdefault("num_classes", 10)
    return build_model_with_cfg(MnistCNN, "mnist_cnn", pretrained, **kwargs)
