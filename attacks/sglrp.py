"""SGLRP heat maps (softmax-gradient LRP) with the bounded deep-Taylor rule set used by the AoA authors.

Rules: z^B for the first layer (bounds = the normalised images of 0 and 1, per channel), z+ (alpha=1, beta=0, bias
ignored) for every other conv/dense layer and for average pooling, w^2 for the logit layer, winner-take-all for
max-pooling, BatchNorm folded into the conv before it, and residual sums split in proportion to each input's
contribution. A module with no rule raises :class:`UnsupportedLayerError` naming it.

The target map A_t starts from p_c on class c, the dual map A_d from p_i on every other class; both starts are
batched into one relevance pass, and ``h = ReLU(A_t - A_d * sum(A_t) / sum(A_d))`` uses the sums measured at the
input, as the definition reads:
w^2 hands relevance to inactive penultimate units, which the z+ layer below cannot pass on, so relevance is not
conserved through the head and ``sum(A_t)`` is not ``p_c``. (Assuming conservation would fold the two passes into
one, but then the map's total drifts negative and ReLU leaves nothing for most confident images.)

Two ways to run the pass, which must agree:
- ``explicit=True`` (the fast path): each layer's transpose is written out (conv-transpose with the positive
  weights, a scatter onto the max-pool winners, ...), so the heat map is an ordinary differentiable graph and the attack's gradient costs a
  single first-order backward;
- ``explicit=False`` (the reference): each transpose is taken by ``autograd.grad(create_graph=True)``, which is
  simple and obviously right but makes the attack's gradient a slow double backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, SelectAdaptivePool2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vgg import VGG, ConvMlp

_EPS = 1e-9


class UnsupportedLayerError(TypeError):
    """The model contains a layer SGLRP has no rule for."""


def _stabilise(z: torch.Tensor) -> torch.Tensor:
    return z + _EPS * torch.where(z >= 0, 1.0, -1.0)


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


class Step:
    """One layer of the relevance graph: ``forward`` keeps what ``relevance`` needs."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def relevance(self, r: torch.Tensor, explicit: bool) -> torch.Tensor:
        raise NotImplementedError


class ReLUStep(Step):
    def forward(self, a):
        return F.relu(a)

    def relevance(self, r, explicit):
        return r  # relevance flows through the non-linearity unchanged


@dataclass
class LinearStep(Step):
    """A conv or dense layer (BatchNorm already folded in); ``rule`` is ``zplus``, ``zb`` or ``wsquare``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: dict | None  # stride/padding/dilation/groups for a conv, None for a dense layer
    rule: str = "zplus"
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None
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

    def forward(self, a):
        self.a = a
        z = self.op(a, self.weight, self.bias)
        if self.rule == "zplus":
            self.wp = self.weight.clamp(min=0)
            self.z = self.op(a, self.wp)
        elif self.rule == "zb":
            lo, hi = (b.view(1, -1, *([1] * (a.dim() - 2))).expand_as(a) for b in self.bounds)
            self.lo, self.hi = lo, hi
            self.wp, self.wn = self.weight.clamp(min=0), self.weight.clamp(max=0)
            self.z = self.op(a, self.weight) - self.op(lo, self.wp) - self.op(hi, self.wn)
        return z

    def _transpose(self, s: torch.Tensor, w: torch.Tensor, at: torch.Tensor, explicit: bool) -> torch.Tensor:
        if explicit:
            return self.op_t(s, w, at)
        return _vjp(lambda x: self.op(x, w), at, s)

    def relevance(self, r, explicit):
        if self.rule == "wsquare":
            w2 = self.weight.pow(2).flatten(1)
            return r @ (w2 / w2.sum(1, keepdim=True).clamp(min=_EPS))
        rv, m = _per_image(r, self.z)
        s = (rv / _stabilise(self.z)).flatten(0, 1)
        if self.rule == "zplus":
            c = self._transpose(s, self.wp, self.a, explicit)
            return (c.view(m, *self.a.shape) * self.a).flatten(0, 1)
        parts = [(self.a, self.weight), (self.lo, self.wp), (self.hi, self.wn)]
        cs = [self._transpose(s, w, t, explicit).view(m, *t.shape) * t for t, w in parts]
        return (cs[0] - cs[1] - cs[2]).flatten(0, 1)


@dataclass
class MaxPoolStep(Step):
    kernel: int | tuple
    stride: int | tuple
    padding: int | tuple
    ceil_mode: bool = False

    def forward(self, a):
        self.a = a
        z, self.idx = F.max_pool2d(a, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode, return_indices=True)
        return z

    def relevance(self, r, explicit):
        if not explicit:
            return _vjp(lambda x: F.max_pool2d(x, self.kernel, self.stride, self.padding, ceil_mode=self.ceil_mode), self.a, r)
        m = r.shape[0] // self.a.shape[0]
        idx = self.idx.repeat(m, 1, 1, 1)
        n, ch, h, w = self.a.shape
        # winner-take-all: scatter each window's relevance onto its argmax (overlapping windows add up)
        out = r.new_zeros(m * n, ch, h * w).scatter_add(2, idx.flatten(2), r.flatten(2))
        return out.view(m * n, ch, h, w)


@dataclass
class AvgPoolStep(Step):
    """Average pooling as a linear layer with positive weights (z+). ``kernel=None`` is global pooling."""

    kernel: int | None = None

    def pool(self, a):
        return a.mean((2, 3)) if self.kernel is None else F.avg_pool2d(a, self.kernel, self.kernel)

    def forward(self, a):
        if self.kernel is not None and (a.shape[-1] % self.kernel or a.shape[-2] % self.kernel):
            raise UnsupportedLayerError(f"SGLRP: {tuple(a.shape[-2:])} map does not tile {self.kernel}x{self.kernel} average pooling")
        self.a = a
        self.z = self.pool(a)
        return self.z

    def relevance(self, r, explicit):
        rv, m = _per_image(r, self.z)
        s = (rv / _stabilise(self.z)).flatten(0, 1)
        if not explicit:
            c = _vjp(self.pool, self.a, s)
        elif self.kernel is None:
            h, w = self.a.shape[-2:]
            c = (s / (h * w))[..., None, None].expand(-1, -1, h, w)
        else:
            c = s.repeat_interleave(self.kernel, 2).repeat_interleave(self.kernel, 3) / self.kernel**2
        return (c.view(m, *self.a.shape) * self.a).flatten(0, 1)


class FlattenStep(Step):
    def forward(self, a):
        self.shape = a.shape
        return a.flatten(1)

    def relevance(self, r, explicit):
        return r.view(-1, *self.shape[1:])


@dataclass
class ResidualStep(Step):
    """``act(branch(a) + shortcut(a))``: the sum's relevance is split in proportion to each input's contribution."""

    branch: list[Step]
    shortcut: list[Step] = field(default_factory=list)

    def forward(self, a):
        self.b = _run(self.branch, a)
        self.s = _run(self.shortcut, a)
        self.z = self.b + self.s
        return F.relu(self.z)

    def relevance(self, r, explicit):
        rv, _ = _per_image(r, self.z)
        share = rv / _stabilise(self.z)
        rb = (share * self.b).flatten(0, 1)
        rs = (share * self.s).flatten(0, 1)
        return _relevance(self.branch, rb, explicit) + _relevance(self.shortcut, rs, explicit)


def _run(steps: list[Step], a: torch.Tensor) -> torch.Tensor:
    for step in steps:
        a = step.forward(a)
    return a


def _relevance(steps: list[Step], r: torch.Tensor, explicit: bool) -> torch.Tensor:
    for step in reversed(steps):
        r = step.relevance(r, explicit)
    return r


# ---- model -> steps -------------------------------------------------------------------------------------------


def _linear(module: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, name: str) -> LinearStep:
    w = module.weight
    b = module.bias if module.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    if bn is not None:  # fold eval-mode BatchNorm into the conv before it
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean) * scale + bn.bias
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedLayerError(f"SGLRP: layer '{name}' uses padding {module.padding!r}/{module.padding_mode!r}")
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        return LinearStep(w, b, conv, name=name)
    return LinearStep(w, b, None, name=name)


def _sequence(modules: list[tuple[str, nn.Module]]) -> list[Step]:
    """Convert a chain of modules, folding each BatchNorm into the conv just before it."""
    steps: list[Step] = []
    i = 0
    while i < len(modules):
        name, mod = modules[i]
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            bn = nxt if isinstance(nxt, nn.BatchNorm2d) else None
            steps.append(_linear(mod, bn, name))
            i += 2 if bn is not None else 1
            continue
        steps += _convert(mod, name)
        i += 1
    return steps


def _children(module: nn.Module, prefix: str, names: list[str]) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}" if prefix else n, getattr(module, n)) for n in names if getattr(module, n, None) is not None]


def _convert(module: nn.Module, name: str) -> list[Step]:
    if isinstance(module, VGG):
        return _sequence(_children(module, name, ["features", "pre_logits", "head"]))
    if isinstance(module, ResNet):
        stem = list(module.conv1.named_children()) if isinstance(module.conv1, nn.Sequential) else [("conv1", module.conv1)]
        return _sequence(stem + _children(module, name, ["bn1", "act1", "maxpool", "layer1", "layer2", "layer3",
                                                          "layer4", "global_pool", "fc"]))
    if isinstance(module, (BasicBlock, Bottleneck)):
        for part in ("se", "drop_block", "aa", "drop_path"):
            sub = getattr(module, part, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                raise UnsupportedLayerError(f"SGLRP has no rule for layer '{name}.{part}' ({type(sub).__name__})")
        parts = ["conv1", "bn1", "act1", "conv2", "bn2"]
        if isinstance(module, Bottleneck):
            parts += ["act2", "conv3", "bn3"]
        shortcut = _sequence(list(module.downsample.named_children())) if module.downsample is not None else []
        return [ResidualStep(_sequence(_children(module, name, parts)), shortcut)]
    if isinstance(module, ConvMlp):
        # timm's VGG head average-pools small maps up to its kernel size; that resampling has no rule here
        return [_ConvMlpGuard(module.input_kernel_size, name)] + _sequence(_children(module, name, ["fc1", "act1", "fc2", "act2"]))
    if isinstance(module, ClassifierHead):
        return _sequence(_children(module, name, ["global_pool", "fc"]))
    if isinstance(module, SelectAdaptivePool2d):
        if module.pool_type != "avg":
            raise UnsupportedLayerError(f"SGLRP has no rule for layer '{name}' (global '{module.pool_type}' pooling)")
        return [AvgPoolStep(None)]
    if isinstance(module, nn.Sequential):
        return _sequence([(f"{name}.{n}" if name else n, m) for n, m in module.named_children()])
    if isinstance(module, nn.ReLU):
        return [ReLUStep()]
    if isinstance(module, nn.MaxPool2d):
        return [MaxPoolStep(module.kernel_size, module.stride, module.padding, module.ceil_mode)]
    if isinstance(module, nn.AvgPool2d):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        if module.stride not in (k, (k, k)) or module.padding not in (0, (0, 0)):
            raise UnsupportedLayerError(f"SGLRP: average pool '{name}' must have stride == kernel and no padding")
        return [AvgPoolStep(k)]
    if isinstance(module, (nn.Flatten,)):
        return [FlattenStep()]
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return []
    if isinstance(module, nn.BatchNorm2d):
        raise UnsupportedLayerError(f"SGLRP: BatchNorm '{name}' does not follow a conv, so it cannot be folded")
    raise UnsupportedLayerError(
        f"SGLRP has no rule for layer '{name or type(module).__name__}' ({type(module).__name__}); "
        "supported: VGG-style (conv, BatchNorm, ReLU, max/avg pool, dense) and ResNet-style networks"
    )


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

    def relevance(self, r, explicit):
        return r


class SGLRP(nn.Module):
    """SGLRP heat maps of an :class:`~model_zoo.zoo.ImageClassifier` (inputs in [0,1])."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        steps = _convert(classifier.model, "")
        linear = [s for s in _flatten_steps(steps) if isinstance(s, LinearStep)]
        if not isinstance(steps[-1], LinearStep):
            raise UnsupportedLayerError("SGLRP: the model must end in a dense/1x1 logit layer")
        linear[0].rule, linear[0].bounds = "zb", classifier.input_bounds()
        steps[-1].rule = "wsquare"
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for [0,1] images; keeps the activations for :meth:`heatmaps`."""
        return _run(self.steps, self.classifier.normalize(x))

    def heatmaps(self, logits: torch.Tensor, classes: list[torch.Tensor], explicit: bool = True) -> torch.Tensor:
        """``(len(classes), B, H, W)`` SGLRP maps for the last :meth:`forward`; ``classes`` are ``(B,)`` index tensors."""
        p = logits.float().softmax(1)
        starts = []
        for c in classes:
            target = torch.zeros_like(p).scatter(1, c[:, None], p.gather(1, c[:, None]))
            starts += [target, p - target]  # A_t from p_c alone; A_d from every other class's probability
        rel = self.input_relevance(torch.cat(starts).to(logits.dtype), explicit).sum(1)
        maps = rel.view(len(classes), 2, *logits.shape[:1], *rel.shape[-2:])
        a_t, a_d = maps[:, 0], maps[:, 1]
        total_t = a_t.flatten(2).sum(2)[..., None, None]
        total_d = _stabilise(a_d.flatten(2).sum(2)[..., None, None])
        return F.relu(a_t - a_d * total_t / total_d)

    def input_relevance(self, r: torch.Tensor, explicit: bool = True) -> torch.Tensor:
        """Relevance on the input pixels (per channel) for starting relevance ``r`` (``(m*B, classes)``)."""
        return _relevance(self.steps, r, explicit)


def _flatten_steps(steps: list[Step]) -> list[Step]:
    out = []
    for s in steps:
        out += _flatten_steps(s.branch) + _flatten_steps(s.shortcut) if isinstance(s, ResidualStep) else [s]
    return out
