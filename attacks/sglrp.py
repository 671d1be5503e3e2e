"""SGLRP heat maps (softmax-gradient LRP) with the bounded deep-Taylor rule set used by the AoA authors.

Rules: z^B for the first layer, z+ (alpha=1, beta=0, bias ignored) for every other conv/dense layer and for average
pooling, w^2 for the logit layer, winner-take-all for max-pooling, BatchNorm folded into the conv before it, and
residual sums split in proportion to each input's contribution. Activations (ReLU, ReLU6) pass relevance on
unchanged. A module with no rule raises :class:`UnsupportedLayerError` naming it. Supported families: VGG, ResNet
(no squeeze-excite), and the piecewise-linear MobileNet/EfficientNet-Lite family (depthwise convs, ReLU6, inverted
residuals with linear bottlenecks, TF "same" padding, MobileNetV3 without SE or hard-swish).

Details that decide whether the maps are the authors':
- z+ on a layer whose input can be negative (the conv after a linear bottleneck) keeps the positive *contributions*
  ``(a w)+ = a+ w+ + a- w-``; on ReLU outputs that is the textbook ``a w+``.
- ``inactive_pool``: global average pooling passes on the relevance of a channel whose map is all zero evenly over
  its positions (``"spread"``, default) rather than dropping it as z+ would (``"drop"``, zennit's rule). The authors'
  Keras VGG19 has Flatten -> Dense where timm has a 1x1 conv, a global pool over the 1x1 map and a dense layer. w^2
  hands relevance to inactive fc7 units too; the Flatten head passes it on through fc7's z+ rule, so a pool over a
  1x1 map must be a reshape (dropping lost half of p_t on VGG19 at 224 px). On bigger maps (ResNet, EfficientNet at
  7x7) "spread" is what w^2 on the equivalent Flatten -> Dense layer would give an inactive channel.
- ``bounds``: z^B bounds are the scalar min and max of each normalised input image (``"image"``, the authors' code)
  or the per-channel images of pixel values 0 and 1 (``"channel"``).
- ``relu``: ``"channel"`` takes ``ReLU(A_t - A_d * sum(A_t) / sum(A_d))`` per colour channel and sums the channels
  (the authors' code); ``"sum"`` sums the channels first.

The target map A_t starts from p_c on class c, the dual map A_d from p_i on every other class. Every rule is linear
in the relevance it passes on, so for k classes one pass with k + 1 starts gives all 2k maps (AoA's two classes: 3
starts, not 4, a quarter less work): the k targets and the dual of the most probable of the k classes (per image),
A_d(k*); any other class j has A_d(j) = A_d(k*) + A_t(k*) - A_t(j). That sum does not cancel: p_j <= 1/2 (p_j <=
p_k*), so the start of A_d(j) holds at least half of p, while the dual of a near-certain class, which is tiny, is
never derived. The totals ``sum(A_t)``, ``sum(A_d)`` are measured at the input rather than taken as p_c and 1 - p_c:
every rule conserves, except that a z+ (or z^B) unit with a zero denominator (no positive contribution at all)
drops what it received. VGG19 (224 px, random weights) keeps p_t to six digits; the pretrained
EfficientNet-Lite0 keeps 4% of it on a real photo, the rest lost in depthwise convs (nine inputs a unit).

Two ways to run the pass, which must agree:
- ``explicit=True`` (the fast path): each layer's transpose is written out (conv-transpose with the positive
  weights, a scatter onto the max-pool winners, ...), so the heat map is an ordinary differentiable graph and the
  attack's gradient costs a single first-order backward;
- ``explicit=False`` (the reference): each transpose is taken by ``autograd.grad(create_graph=True)``, which is
  simple and obviously right but makes the attack's gradient a slow double backward.

Speed (``benchmarks/bench_attack_step.py``): on CPU the fast path runs about as fast, relative to PGD, as the two
steps' FLOP counts allow. Beyond the convolutions its time goes to elementwise work on relevance-sized tensors,
which is why the rules avoid products by 1, sums from 0 and per-start divisions, and make their weight parts once
per model.

Precision: the relevance pass computes in the dtype of the starting relevance (fp32, or fp64 for an fp64 model)
unless an autocast context lowers it; :mod:`attacks.precision` says why AoA keeps it in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ClassifierHead, Conv2dSame, SelectAdaptivePool2d
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vgg import VGG, ConvMlp

from attacks.options import BOUNDS, INACTIVE_POOL, RELU

_EPS = 1e-9
# sum(A_d) is at most 1 - p_c: 1e-8 or less on a near-certain class, where _EPS would be a sizeable share of it and
# the map would leave the formula (a test net at 1 - p = 1e-9: 1,900 times off in L1). The authors' code adds 1e-20.
_TOTAL_EPS = 1e-20
# a residual sum divides its relevance by the sum only where the sum's output is zero (the global pool's spread)
_SUM_EPS = 1e-9


class UnsupportedLayerError(TypeError):
    """The model contains a layer SGLRP has no rule for."""


def _stabilise(z: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def _signed_sum(terms) -> torch.Tensor:
    """``sum(sign * term)`` over ``(sign, term)`` pairs (the first sign +1) with no product by 1 and no sum starting
    from 0: on relevance-sized tensors each of those is a full pass, and another in the attack's backward."""
    terms = iter(terms)  # one term at a time: each is relevance-sized
    _, total = next(terms)
    for sign, term in terms:
        total = total + term if sign > 0 else total - term
    return total


def _per_image(r: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View relevance of ``m*B`` rows (m classes stacked) as ``(m, B, ...)`` against a ``(B, ...)`` tensor."""
    m = r.shape[0] // t.shape[0]
    return r.view(m, *t.shape), m


def _vjp(fn, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Reference transpose: the gradient of ``fn`` at ``a`` against ``s``, kept differentiable (double backward)."""
    m = s.shape[0] // a.shape[0]
    with torch.enable_grad():
        a = a.repeat(m, *([1] * (a.dim() - 1)))
        if not a.requires_grad:
            a = a.detach().requires_grad_()
        (c,) = torch.autograd.grad(fn(a), a, s, create_graph=True)
    return c


class Relevance(NamedTuple):
    """Relevance ``r`` at a step's output and, where the rule above gives it, ``ratio`` with ``r = output * ratio``
    wherever the output is non-zero (None: not known).

    The ratio is what keeps AoA's fp32 gradient: a residual sum splits ``r`` by ``r / (b + s)``, and ``r`` arrives
    as ``(b + s) * ratio``; dividing again gives the same value, but the attack's gradient of ``r / (b + s)`` is
    then a difference of two terms of order ``ratio / (b + s)`` that cancel, so a unit with ``b + s`` near zero (a
    linear bottleneck's sum, where fp32 rounding is all there is) gets a large spurious gradient. Taking the ratio
    itself is the same rule without the cancellation (see :class:`ResidualStep`)."""

    r: torch.Tensor
    ratio: torch.Tensor | None = None


class Step:
    """One layer of the relevance graph: ``forward`` keeps the activations that ``relevance`` needs.
    ``ratio_used``: whether a residual split below consumes the ratio this step returns (else it is not made)."""

    ratio_used = True

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def relevance(self, rel: Relevance, explicit: bool) -> Relevance:
        raise NotImplementedError


@dataclass
class ActivationStep(Step):
    """ReLU (``cap=None``) or ReLU6 (``cap=6``): relevance flows through the non-linearity unchanged."""

    cap: float | None = None

    def forward(self, a):
        self.z = a
        return self.apply(a)

    def apply(self, a: torch.Tensor) -> torch.Tensor:
        return F.relu(a) if self.cap is None else a.clamp(0, self.cap)

    def input_ratio(self, ratio: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``ratio`` against the output ``act(z)`` as a ratio against the input ``z``: times ``act(z) / z``, which is
        1 or 0 except above a ReLU6's cap (``6 / z`` there, far from zero)."""
        gate = (z > 0).to(ratio.dtype)
        if self.cap is not None:
            gate = torch.where(z > self.cap, self.cap / z, gate)
        return (ratio.view(-1, *z.shape) * gate).flatten(0, 1)

    def relevance(self, rel, explicit):
        if rel.ratio is None or not self.ratio_used:
            return Relevance(rel.r)
        return Relevance(rel.r, self.input_ratio(rel.ratio, self.z.to(rel.r.dtype)))


@dataclass
class LinearStep(Step):
    """A conv or dense layer (BatchNorm already folded in); ``rule`` is ``zplus``, ``zb`` or ``wsquare``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: dict | None  # stride/padding/dilation/groups for a conv, None for a dense layer
    same_pad: bool = False  # TF "same" padding: pad (asymmetrically) at run time, as timm's Conv2dSame
    rule: str = "zplus"
    bounds: str = "image"  # z^B bounds (see the module docstring)
    channel_bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # the normalised images of 0 and 1
    signed_input: bool = False  # the input can be negative (set by :func:`_mark_signed_inputs`)
    name: str = ""

    def op(self, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(a, w, bias, **self.conv) if self.conv is not None else F.linear(a, w, bias)

    def op_t(self, s: torch.Tensor, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Explicit transpose of ``op`` applied to ``s`` (shape of the layer's input ``like``)."""
        if self.conv is None:
            return s @ w
        c = self.conv
        h, wd = like.shape[-2:]
        k, st, p, d = w.shape[-1], c["stride"], c["padding"], c["dilation"]
        out_h = (h + 2 * p[0] - d[0] * (w.shape[-2] - 1) - 1) // st[0] + 1
        out_w = (wd + 2 * p[1] - d[1] * (k - 1) - 1) // st[1] + 1
        pad_h = h - ((out_h - 1) * st[0] - 2 * p[0] + d[0] * (w.shape[-2] - 1) + 1)
        pad_w = wd - ((out_w - 1) * st[1] - 2 * p[1] + d[1] * (k - 1) + 1)
        return F.conv_transpose2d(s, w, None, st, p, (pad_h, pad_w), c["groups"], d)

    def _same_padding(self, h: int, w: int) -> tuple[int, int, int, int]:
        """timm's ``pad_same``: total padding to cover the input at this stride, the odd pixel on the right/bottom."""
        st, d, (kh, kw) = self.conv["stride"], self.conv["dilation"], self.weight.shape[-2:]
        ph = max((-(-h // st[0]) - 1) * st[0] + (kh - 1) * d[0] + 1 - h, 0)
        pw = max((-(-w // st[1]) - 1) * st[1] + (kw - 1) * d[1] + 1 - w, 0)
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def forward(self, a):
        if self.rule == "zb":  # bounds of the unpadded input; padding is zero for the input and both bounds alike
            if self.bounds == "image":
                lo = a.detach().flatten(1).amin(1).view(-1, *([1] * (a.dim() - 1))).expand_as(a)
                hi = a.detach().flatten(1).amax(1).view(-1, *([1] * (a.dim() - 1))).expand_as(a)
            else:
                lo, hi = (b.view(1, -1, *([1] * (a.dim() - 2))).expand_as(a) for b in self.channel_bounds)
        self.pad = self._same_padding(*a.shape[-2:]) if self.same_pad else None
        if self.pad:
            a = F.pad(a, self.pad)
        if self.rule == "zb":
            self.lo, self.hi = (F.pad(b, self.pad) if self.pad else b for b in (lo, hi))
        self.a = a
        return self.op(a, self.weight, self.bias)

    def _transpose(self, s: torch.Tensor, w: torch.Tensor, at: torch.Tensor, explicit: bool) -> torch.Tensor:
        if explicit:
            return self.op_t(s, w, at)
        return _vjp(lambda x: self.op(x, w), at, s)

    @cached_property
    def rule_weights(self) -> dict[str, torch.Tensor]:
        """The weights the rule uses, made once per model (the rule is final by the first relevance pass): w^2
        normalised per output for ``wsquare``; the positive part for z+ and z^B, the negative part where the input
        can be negative (z+ on a signed input) and for z^B's upper bound."""
        w = self.weight
        if self.rule == "wsquare":
            w2 = w.pow(2).flatten(1)
            return {"w2": w2 / w2.sum(1, keepdim=True).clamp(min=_EPS)}
        parts = {"w": w, "wp": w.clamp(min=0)}
        if self.rule == "zb" or self.signed_input:
            parts["wn"] = w.clamp(max=0)
        return parts

    def relevance(self, rel, explicit):
        r = rel.r
        weights = {k: v.to(r.dtype) for k, v in self.rule_weights.items()}
        if self.rule == "wsquare":
            return Relevance(r @ weights["w2"])
        a = self.a.to(r.dtype)
        w, wp, wn = weights["w"], weights["wp"], weights.get("wn")
        if self.rule == "zplus" and self.signed_input:
            parts = [(a.clamp(min=0), wp, 1), (a.clamp(max=0), wn, 1)]  # positive contributions a+w+ + a-w-
        elif self.rule == "zplus":
            parts = [(a, wp, 1)]
        else:
            parts = [(a, w, 1), (self.lo.to(r.dtype), wp, -1), (self.hi.to(r.dtype), wn, -1)]
        z = _signed_sum((sign, self.op(t, wt)) for t, wt, sign in parts)
        rv, m = _per_image(r, z)
        # z+ sums non-negative products: z >= 0, so its stabiliser needs no sign test. Dividing by z is a product
        # with its reciprocal, taken once per image rather than once per start (here, in AvgPool and ResidualStep)
        s = (rv * (z + _EPS if self.rule == "zplus" else _stabilise(z)).reciprocal()).flatten(0, 1)
        back = [self._transpose(s, wt, t, explicit).view(m, *t.shape) for t, wt, _ in parts]
        if self.rule == "zb":  # the input layer: nothing below asks for a ratio
            out, ratio = _signed_sum((sign, c * t) for c, (t, _, sign) in zip(back, parts)), None
        else:  # z+ passes a * c on (c from the positive or, on a signed input, the negative part): the ratio is c
            ratio = back[0] if len(back) == 1 else torch.where(a > 0, back[0], back[1])
            out = ratio * a
        out, ratio = (None if v is None else self._unpad(v.flatten(0, 1)) for v in (out, ratio))
        return Relevance(out, ratio if self.ratio_used else None)

    def _unpad(self, v: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return v
        left, right, top, bottom = self.pad
        return v[..., top : v.shape[-2] - bottom, left : v.shape[-1] - right]


@dataclass
class MaxPoolStep(Step):
    kernel: int | tuple
    stride: int | tuple
    padding: int | tuple
    ceil_mode: bool = False

    def pool(self, a):
        return F.max_pool2d(a, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode)

    def forward(self, a):
        self.a = a
        z, self.idx = F.max_pool2d(a, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode, return_indices=True)
        return z

    def relevance(self, rel, explicit):
        # winner-take-all: each window's relevance goes to its argmax (overlapping windows add up); a winner's
        # input equals the window's output, so the ratio moves the same way
        return Relevance(*(None if v is None else self._to_winners(v, explicit)
                           for v in (rel if self.ratio_used else rel[:1])))

    def _to_winners(self, r: torch.Tensor, explicit: bool) -> torch.Tensor:
        if not explicit:
            return _vjp(self.pool, self.a.to(r.dtype), r)
        m = r.shape[0] // self.a.shape[0]
        idx = self.idx.repeat(m, 1, 1, 1)
        n, ch, h, w = self.a.shape
        out = r.new_zeros(m * n, ch, h * w).scatter_add(2, idx.flatten(2), r.flatten(2))
        return out.view(m * n, ch, h, w)


@dataclass
class AvgPoolStep(Step):
    """Average pooling as a linear layer with positive weights (z+). ``kernel=None`` is global pooling, which passes
    an all-zero channel's relevance on evenly when ``spread_inactive`` (so a pool over a 1x1 map is a reshape)."""

    kernel: int | None = None
    spread_inactive: bool = True

    def pool(self, a):
        return a.mean((2, 3)) if self.kernel is None else F.avg_pool2d(a, self.kernel, self.kernel)

    def forward(self, a):
        if self.kernel is not None and (a.shape[-1] % self.kernel or a.shape[-2] % self.kernel):
            raise UnsupportedLayerError(f"SGLRP: {tuple(a.shape[-2:])} map does not tile {self.kernel}x{self.kernel} average pooling")
        self.a = a
        return self.pool(a)

    def relevance(self, rel, explicit):
        r = rel.r
        a = self.a.to(r.dtype)
        z = self.pool(a)
        rv, m = _per_image(r, z)
        s = (rv * torch.where(z > 0, z, 1).reciprocal()).flatten(0, 1)  # inputs are >= 0: z = 0 only where every input is 0
        if not explicit:
            c = _vjp(self.pool, a, s)
        elif self.kernel is None:
            h, w = a.shape[-2:]
            c = (s / (h * w))[..., None, None].expand(-1, -1, h, w)
        else:
            c = s.repeat_interleave(self.kernel, 2).repeat_interleave(self.kernel, 3) / self.kernel**2
        out = c.view(m, *a.shape) * a
        if self.kernel is None and self.spread_inactive:  # inactive channels: spread evenly instead of dropping
            h, w = a.shape[-2:]
            even = (rv / (h * w))[..., None, None].expand_as(out)
            out = torch.where((z > 0)[None, ..., None, None], out, even)
        ratio = c.reshape(out.flatten(0, 1).shape) if self.ratio_used else None  # c: the ratio where a is not 0
        return Relevance(out.flatten(0, 1), ratio)


class FlattenStep(Step):
    def forward(self, a):
        self.shape = a.shape
        return a.flatten(1)

    def relevance(self, rel, explicit):
        return Relevance(*(None if v is None else v.view(-1, *self.shape[1:]) for v in rel))


@dataclass
class ResidualStep(Step):
    """``act(branch(a) + shortcut(a))`` (``act=None``: a linear bottleneck's plain sum): the sum's relevance is
    split in proportion to each input's contribution, ``r * b / (b + s)`` and ``r * s / (b + s)``.

    ``r / (b + s)`` is the ratio the rule above passes on (see :class:`Relevance`); only where the sum's output is
    zero (relevance the global pool spread over an all-zero channel) is ``r`` divided by the sum."""

    branch: list[Step]
    shortcut: list[Step] = field(default_factory=list)
    act: ActivationStep | None = None

    def forward(self, a):
        self.b = _run(self.branch, a)
        self.s = _run(self.shortcut, a)
        z = self.b + self.s
        return self.act.apply(z) if self.act is not None else z

    def relevance(self, rel, explicit):
        b, s = self.b.to(rel.r.dtype), self.s.to(rel.r.dtype)
        z = b + s
        rv, _ = _per_image(rel.r, b)
        share = rv * _stabilise(z, _SUM_EPS).reciprocal()
        if rel.ratio is not None:
            ratio = rel.ratio if self.act is None else self.act.input_ratio(rel.ratio, z)
            out = z if self.act is None else self.act.apply(z)
            share = torch.where(out != 0, ratio.view(share.shape), share)
        branch = _relevance(self.branch, Relevance((share * b).flatten(0, 1), share.flatten(0, 1)), explicit)
        shortcut = _relevance(self.shortcut, Relevance((share * s).flatten(0, 1), share.flatten(0, 1)), explicit)
        ratio = branch.ratio + shortcut.ratio if self.ratio_used else None
        return Relevance(branch.r + shortcut.r, ratio)


def _run(steps: list[Step], a: torch.Tensor) -> torch.Tensor:
    for step in steps:
        a = step.forward(a)
    return a


def _relevance(steps: list[Step], rel: Relevance, explicit: bool) -> Relevance:
    for step in reversed(steps):
        rel = step.relevance(rel, explicit)
    return rel


def _flatten_steps(steps: list[Step]) -> list[Step]:
    out = []
    for s in steps:
        out += _flatten_steps(s.branch) + _flatten_steps(s.shortcut) if isinstance(s, ResidualStep) else [s]
    return out


def _mark_ratio_use(steps: list[Step], used_below: bool) -> None:
    """Set each step's ``ratio_used``, bottom to top: a residual split consumes the ratio at its output, a linear
    or pooling step makes its own, and an activation, max-pool or reshape passes on what it is given."""
    used = used_below
    for step in steps:
        step.ratio_used = used
        if isinstance(step, ResidualStep):
            _mark_ratio_use(step.branch, used)
            _mark_ratio_use(step.shortcut, used)
            used = True
        elif isinstance(step, (LinearStep, AvgPoolStep)):
            used = False


def _mark_signed_inputs(steps: list[Step], nonneg: bool) -> bool:
    """Flag each linear layer whose input can be negative; returns whether the chain's output is non-negative."""
    for s in steps:
        if isinstance(s, LinearStep):
            s.signed_input, nonneg = not nonneg, False
        elif isinstance(s, ActivationStep):
            nonneg = True
        elif isinstance(s, ResidualStep):
            both = _mark_signed_inputs(s.branch, nonneg) & _mark_signed_inputs(s.shortcut, nonneg)
            nonneg = s.act is not None or both
    return nonneg


# ---- model -> steps -------------------------------------------------------------------------------------------


def _linear(module: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, name: str) -> LinearStep:
    w = module.weight
    b = module.bias if module.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if bn is not None:  # fold eval-mode BatchNorm into the conv before it
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean) * scale + bn.bias
    w, b = w.detach(), b.detach()
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedLayerError(f"SGLRP: layer '{name}' uses padding {module.padding!r}/{module.padding_mode!r}")
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        return LinearStep(w, b, conv, same_pad=isinstance(module, Conv2dSame), name=name)
    return LinearStep(w, b, None, name=name)


def _activation(module: nn.Module, name: str) -> list[Step]:
    if isinstance(module, nn.ReLU):
        return [ActivationStep()]
    if isinstance(module, nn.ReLU6):
        return [ActivationStep(6.0)]
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return []
    raise UnsupportedLayerError(f"SGLRP has no rule for layer '{name}' ({type(module).__name__})")


def _sequence(modules: list[tuple[str, nn.Module]]) -> list[Step]:
    """Convert a chain of modules, folding each BatchNorm (and its fused activation) into the conv just before it."""
    steps: list[Step] = []
    i = 0
    while i < len(modules):
        name, mod = modules[i]
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            bn = nxt if isinstance(nxt, nn.BatchNorm2d) else None
            steps.append(_linear(mod, bn, name))
            if isinstance(bn, BatchNormAct2d):
                steps += _activation(bn.drop, f"{modules[i + 1][0]}.drop") + _activation(bn.act, f"{modules[i + 1][0]}.act")
            i += 2 if bn is not None else 1
            continue
        steps += _convert(mod, name)
        i += 1
    return steps


def _children(module: nn.Module, prefix: str, names: list[str]) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}" if prefix else n, getattr(module, n)) for n in names if getattr(module, n, None) is not None]


def _refuse_extras(module: nn.Module, name: str, parts: tuple[str, ...]) -> None:
    """Squeeze-excite, anti-aliasing and stochastic-depth modules have no rule here: refuse them by name."""
    for part in parts:
        sub = getattr(module, part, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise UnsupportedLayerError(f"SGLRP has no rule for layer '{name}.{part}' ({type(sub).__name__})")


_MOBILE_BLOCKS = {  # the modules of each timm mobile block in forward order (BatchNorm folded into the conv before it)
    DepthwiseSeparableConv: ["conv_dw", "bn1", "conv_pw", "bn2"],
    InvertedResidual: ["conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"],
    ConvBnAct: ["conv", "bn1"],
}


def _convert(module: nn.Module, name: str) -> list[Step]:
    if isinstance(module, VGG):
        return _sequence(_children(module, name, ["features", "pre_logits", "head"]))
    if isinstance(module, ResNet):
        stem = list(module.conv1.named_children()) if isinstance(module.conv1, nn.Sequential) else [("conv1", module.conv1)]
        return _sequence(stem + _children(module, name, ["bn1", "act1", "maxpool", "layer1", "layer2", "layer3",
                                                          "layer4", "global_pool", "fc"]))
    if isinstance(module, (BasicBlock, Bottleneck)):
        _refuse_extras(module, name, ("se", "drop_block", "aa", "drop_path"))
        parts = ["conv1", "bn1", "act1", "conv2", "bn2"]
        if isinstance(module, Bottleneck):
            parts += ["act2", "conv3", "bn3"]
        shortcut = _sequence(list(module.downsample.named_children())) if module.downsample is not None else []
        return [ResidualStep(_sequence(_children(module, name, parts)), shortcut, ActivationStep())]
    if isinstance(module, EfficientNet):
        return _sequence(_children(module, name, ["conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool",
                                                  "classifier"]))
    if isinstance(module, MobileNetV3):
        return _sequence(_children(module, name, ["conv_stem", "bn1", "blocks", "global_pool", "conv_head",
                                                  "norm_head", "act2", "flatten", "classifier"]))
    if type(module) in _MOBILE_BLOCKS:
        _refuse_extras(module, name, ("se", "aa", "drop_path"))
        branch = _sequence(_children(module, name, _MOBILE_BLOCKS[type(module)]))
        return [ResidualStep(branch)] if module.has_skip else branch  # identity skip, no activation after the sum
    if isinstance(module, ConvMlp):
        # timm's VGG head average-pools small maps up to its kernel size; that resampling has no rule here
        return [_ConvMlpGuard(module.input_kernel_size, name)] + _sequence(_children(module, name, ["fc1", "act1", "fc2", "act2"]))
    if isinstance(module, ClassifierHead):
        return _sequence(_children(module, name, ["global_pool", "fc"]))
    if isinstance(module, SelectAdaptivePool2d):
        if module.pool_type != "avg":
            raise UnsupportedLayerError(f"SGLRP has no rule for layer '{name}' (global '{module.pool_type}' pooling)")
        return [AvgPoolStep(None)] if isinstance(module.flatten, nn.Flatten) else [AvgPoolStep(None), _Unflatten()]
    if isinstance(module, nn.Sequential):
        return _sequence([(f"{name}.{n}" if name else n, m) for n, m in module.named_children()])
    if isinstance(module, nn.MaxPool2d):
        return [MaxPoolStep(module.kernel_size, module.stride, module.padding, module.ceil_mode)]
    if isinstance(module, nn.AvgPool2d):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        if module.stride not in (k, (k, k)) or module.padding not in (0, (0, 0)):
            raise UnsupportedLayerError(f"SGLRP: average pool '{name}' must have stride == kernel and no padding")
        return [AvgPoolStep(k)]
    if isinstance(module, nn.Flatten):
        return [FlattenStep()]
    if isinstance(module, nn.BatchNorm2d):
        raise UnsupportedLayerError(f"SGLRP: BatchNorm '{name}' does not follow a conv, so it cannot be folded")
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout)):
        return _activation(module, name)
    raise UnsupportedLayerError(
        f"SGLRP has no rule for layer '{name or type(module).__name__}' ({type(module).__name__}); "
        "supported: VGG, ResNet and MobileNet/EfficientNet-Lite style networks (conv, BatchNorm, ReLU/ReLU6, "
        "max/avg pool, dense, residual sums)"
    )


class _Unflatten(Step):
    """A global pool that keeps the 1x1 spatial dims (MobileNetV3's head conv follows it)."""

    def forward(self, a):
        return a[..., None, None]

    def relevance(self, rel, explicit):
        return Relevance(*(None if v is None else v.flatten(1) for v in rel))


@dataclass
class _ConvMlpGuard(Step):
    kernel: int
    name: str

    def forward(self, a):
        if min(a.shape[-2:]) < self.kernel:
            raise UnsupportedLayerError(
                f"SGLRP: '{self.name}' would resample a {tuple(a.shape[-2:])} map up to {self.kernel}x{self.kernel}; "
                "use a larger input so the feature map covers the head's kernel"
            )
        return a

    def relevance(self, rel, explicit):
        return rel


class SGLRP(nn.Module):
    """SGLRP heat maps of an :class:`~model_zoo.zoo.ImageClassifier` (inputs in [0,1]).

    ``bounds`` and ``relu`` choose between the authors' conventions (the defaults) and the literal reading of the
    paper, ``inactive_pool`` between a Flatten head's behaviour (default) and plain z+; see the module docstring.
    The rules use the weights as they are at construction (BatchNorm folded, positive parts made once): build a new
    one after the model changes.
    """

    def __init__(self, classifier: nn.Module, bounds: str = "image", relu: str = "channel",
                 inactive_pool: str = "spread"):
        super().__init__()
        for name, value, allowed in (("bounds", bounds, BOUNDS), ("relu", relu, RELU),
                                     ("inactive_pool", inactive_pool, INACTIVE_POOL)):
            if value not in allowed:
                raise ValueError(f"SGLRP: {name} must be one of {allowed}, not {value!r}")
        self.classifier, self.relu = classifier, relu
        steps = _convert(classifier.model, "")
        flat = _flatten_steps(steps)
        for step in flat:
            if isinstance(step, AvgPoolStep):
                step.spread_inactive = inactive_pool == "spread"
        linear = [s for s in flat if isinstance(s, LinearStep)]
        if not isinstance(steps[-1], LinearStep):
            raise UnsupportedLayerError("SGLRP: the model must end in a dense/1x1 logit layer")
        _mark_signed_inputs(steps, nonneg=False)
        _mark_ratio_use(steps, used_below=False)
        first = linear[0]
        first.rule, first.bounds, first.channel_bounds = "zb", bounds, classifier.input_bounds()
        steps[-1].rule = "wsquare"
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for [0,1] images; keeps the activations for :meth:`heatmaps`."""
        return _run(self.steps, self.classifier.normalize(x))

    def heatmaps(self, logits: torch.Tensor, classes: list[torch.Tensor], explicit: bool = True) -> torch.Tensor:
        """``(len(classes), B, H, W)`` SGLRP maps for the last :meth:`forward`; ``classes`` are ``(B,)`` index tensors.
        One relevance pass with ``len(classes) + 1`` starts (the module docstring says why that is enough)."""
        p = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(1)
        c = torch.stack(classes)  # (k, B)
        p_c = p.gather(1, c.T).T
        targets = torch.zeros(len(c), *p.shape, dtype=p.dtype, device=p.device).scatter(2, c[..., None], p_c[..., None])
        top = p_c.argmax(0)  # per image, the most probable of the classes: its dual is the one computed
        top_target = targets.gather(0, top.view(1, -1, 1).expand(1, *p.shape))[0]
        rel = self.input_relevance(torch.cat([targets.flatten(0, 1), p - top_target]), explicit)
        rel = rel.view(len(c) + 1, *p.shape[:1], *rel.shape[1:])
        a_t, top_dual = rel[:-1], rel[-1]
        is_top = (torch.arange(len(c), device=p.device)[:, None] == top).view(len(c), -1, 1, 1, 1)
        a_t_top = a_t.gather(0, top.view(1, -1, 1, 1, 1).expand(1, *a_t.shape[1:]))[0]
        a_d = torch.where(is_top, top_dual, top_dual + a_t_top - a_t)
        total_t = a_t.flatten(2).sum(2)[..., None, None, None]
        total_d = _stabilise(a_d.flatten(2).sum(2)[..., None, None, None], _TOTAL_EPS)
        h = a_t - a_d * total_t / total_d
        return F.relu(h).sum(2) if self.relu == "channel" else F.relu(h.sum(2))

    def input_relevance(self, r: torch.Tensor, explicit: bool = True) -> torch.Tensor:
        """Relevance on the input pixels (per channel) for starting relevance ``r`` (``(m*B, classes)``)."""
        return _relevance(self.steps, Relevance(r), explicit).r
