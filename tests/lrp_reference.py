"""Test support for SGLRP (also used by ``benchmarks/bench_sglrp.py``): the Flatten-head twin of a timm VGG, and an
independent LRP: zennit's rules (z^B box, z+, w^2, pass-through activations, proportional sums and pools) on a copy
of the timm network, with zennit's BatchNorm merging and a canonizer that turns the timm residual additions into
zennit ``Sum`` modules. Nothing here shares code with :mod:`attacks.sglrp`."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite, MixedComposite, NameMapComposite
from zennit.layer import Sum
from zennit.rules import Norm, Pass, WSquare, ZBox, ZPlus
from zennit.types import Activation, AvgPool

from model_zoo.zoo import ImageClassifier

_STAB = 1e-9  # the stabiliser attacks.sglrp adds (same sign convention), so only the rules are compared
_SUM_STAB = 1e-30  # attacks.sglrp splits a residual sum by the exact ratio (no stabiliser where the sum is not 0)


class MobileSkipCanonizer(AttributeCanonizer):
    """timm's mobile blocks add the skip inline; route the sum through a zennit ``Sum`` so a rule can own it."""

    def __init__(self):
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name, module):
        if isinstance(module, (InvertedResidual, DepthwiseSeparableConv)) and module.has_skip:
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self, x):
        if isinstance(self, InvertedResidual):
            out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        else:
            out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return self.canonizer_sum(torch.stack([x, out], dim=-1))


def flatten_head_twin(vgg: ImageClassifier) -> ImageClassifier:
    """The same weights as the authors' Keras layout: features -> fc6 (7x7 conv) -> Flatten -> Dense -> Dense."""
    m = vgg.model
    fc7 = nn.Linear(m.pre_logits.fc2.in_channels, m.pre_logits.fc2.out_channels)
    fc7.weight.data.copy_(m.pre_logits.fc2.weight.flatten(1))
    fc7.bias.data.copy_(m.pre_logits.fc2.bias)
    net = nn.Sequential(*m.features, m.pre_logits.fc1, nn.ReLU(), nn.Flatten(), fc7, nn.ReLU(), m.head.fc)
    return ImageClassifier(net, vgg.data_config).double().eval()


def _split_batchnorm_act(net: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d is BatchNorm and activation in one module; zennit merges only leaf BatchNorms, so make
    it a plain BatchNorm2d followed by the activation."""
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps).to(child.weight).eval()
                bn.load_state_dict(child.state_dict(), strict=False)
                setattr(parent, child_name, nn.Sequential(bn, child.drop, child.act))
    return net


def zennit_input_relevance(net: nn.Module, x_normalised: torch.Tensor, start: torch.Tensor, first: str, last: str,
                           low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per-channel relevance on the (normalised) input for starting relevance ``start`` on the logits.

    ``first``/``last`` name the first conv (z^B with bounds ``low``/``high``) and the logit layer (w^2)."""
    net = _split_batchnorm_act(copy.deepcopy(net).eval())
    with torch.no_grad():  # zennit's merge leaves each BatchNorm dividing by sqrt(1 + eps): move eps into the variance
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var += bn.eps
                bn.eps = 0.0
    composite = MixedComposite(
        [
            NameMapComposite([([first], ZBox(low, high, stabilizer=_STAB, zero_params=["bias"])),
                              ([last], WSquare(stabilizer=_STAB, zero_params=["bias"]))]),
            LayerMapComposite([(Activation, Pass()), (AvgPool, Norm(stabilizer=_STAB)), (Sum, Norm(stabilizer=_SUM_STAB)),
                               ((nn.Conv2d, nn.Linear), ZPlus(stabilizer=_STAB, zero_params=["bias"]))]),
        ],
        canonizers=[SequentialMergeBatchNorm(), MobileSkipCanonizer()],
    )
    x = x_normalised.detach().clone().requires_grad_()
    with composite.context(net) as modified:
        out = modified(x)
        (relevance,) = torch.autograd.grad(out, x, start)
    return relevance


def zennit_model_relevance(model: ImageClassifier, x: torch.Tensor, start: torch.Tensor, bounds: str) -> torch.Tensor:
    """:func:`zennit_input_relevance` for a zoo classifier on [0,1] images, z^B bounds as ``SGLRP(bounds=...)``."""
    xn = model.normalize(x)
    if bounds == "image":
        low = xn.flatten(1).amin(1).view(-1, 1, 1, 1).expand_as(xn)
        high = xn.flatten(1).amax(1).view(-1, 1, 1, 1).expand_as(xn)
    else:
        low, high = (b.expand_as(xn) for b in model.input_bounds())
    names = [n for n, mod in model.model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    return zennit_input_relevance(model.model, xn, start, names[0], names[-1], low, high)
