"""Demo-scale architectures, registered in timm's registry so every caller uses ``timm.create_model``.

Stock timm VGGs carry a 4096-wide head sized for 224 px; at the demo world's 32 px that head dominates and trains
poorly in bounded CPU time. ``vgg_demo`` is the same timm ``VGG`` class (conv, BatchNorm, ReLU, max-pool, then
timm's ConvMlp head) with a narrow config whose last feature map (8x8 at 32 px) still fits the head's 7x7 kernel.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vgg import VGG

default_cfgs = generate_default_cfgs(
    {
        "vgg_demo.untrained": dict(
            url="",
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(1, 1),
            crop_pct=1.0,
            interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            first_conv="features.0",
            classifier="head.fc",
        )
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
