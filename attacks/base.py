"""The one attack interface: budgets, input diversity, the step rule and per-image records live here.

Every attack is an iterative, transfer-oriented attack on a surrogate. A subclass only defines the per-image
objective it *increases* (:meth:`Attack.objective`); this base owns the rest, identically for every attack, so a
transfer comparison at one budget is fair:

- inputs and outputs are [0,1] NCHW images on the uint8 grid (normalisation is inside the model wrapper);
- gradient tricks: SI (scale copies x/2^i, optionally counting x twice as the AoA authors do), DI (with probability
  ``di``, a random resize to 90-99% and zero-pad back), TI (Gaussian smoothing of the gradient), MI (momentum on
  L1-normalised gradients);
- the step: ``x <- clip(x + alpha * d, 0, 1)`` then projection into the L-inf ball ``eps``. Sign attacks (FGSM
  family) take ``d = sign(g)`` with ``g`` the mean of the copies' raw gradients (Lin et al.'s SI); L1 attacks (AoA)
  take ``d`` = the mean of the copies' gradients, each scaled to unit mean absolute value (``g * N / ||g||_1``), and
  do not normalise that mean again (the AoA authors' code: with SI the step is shorter than ``alpha``);
- the budget: iterate until the RMSD from the original would exceed ``eta``; that last step is shortened (by
  bisection on its length) so that after rounding to uint8 the RMSD is at most ``eta``: the budget is a hard bound
  and is used up. ``max_steps`` caps the loop;
- precision: ``precision`` picks a policy of :mod:`attacks.precision` for the objective and its gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from attacks.options import PRECISIONS
from attacks.precision import forward_precision, resolve_precision
from attacks.sglrp import SGLRP, UnsupportedLayerError


@dataclass(frozen=True)
class AttackConfig:
    """Budgets on the [0,1] scale (DAmageNet, on 0-255: eta=7, eps=25.5, alpha=2)."""

    eta: float = 7 / 255  # RMSD budget (hard, after uint8 rounding)
    eps: float = 25.5 / 255  # L-inf bound
    alpha: float = 2 / 255  # step size
    max_steps: int = 100
    si: int = 1  # number of scale copies x/2^i (1 = off; SI uses 4 or 5)
    si_x_twice: bool = False  # count the unscaled copy twice (AoA authors: x, x, x/2, x/4, x/8)
    di: float = 0.0  # probability of the DI resize-and-pad transform
    ti: int = 0  # TI Gaussian kernel size (0 = off; 15 at 224 px)
    mi: float = 0.0  # MI momentum decay (0 = off; MI-FGSM uses 1.0)
    precision: str = "fp32"  # fp32 (IEEE, no TF32) | bf16 (autocast) | auto (per device): see attacks.precision
    seed: int = 0
    sub_batch: int = 0  # images (SI copies included) per forward/backward pass; 0: all at once. Bounds memory

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")

    def copy_weights(self) -> torch.Tensor:
        """Weight of each SI copy x/2^i in the averaged gradient (x counted twice: it has two shares)."""
        w = torch.ones(self.si, dtype=torch.float64)
        if self.si_x_twice:
            w[0] = 2
        return w / w.sum()

    def digest(self, name: str, extra: dict | None = None) -> str:
        """Short hash of the attack's name and full config (provenance in every record)."""
        blob = json.dumps({"attack": name, **asdict(self), **(extra or {})}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rmsd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference per image, on the 0-255 scale."""
    return (a - b).flatten(1).pow(2).mean(1).sqrt() * 255


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the uint8 grid (the authors truncate; rounding halves the error)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def quantize_within(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Round ``x`` to the uint8 grid, keeping it within ``eps`` of the on-grid ``x0`` (rounding may not add to L-inf)."""
    levels = math.floor(eps * 255 + 1e-6)
    base = torch.round(x0 * 255)
    return (base + (torch.round(x.clamp(0, 1) * 255) - base).clamp(-levels, levels)) / 255


def unit_mean_abs(g: torch.Tensor) -> torch.Tensor:
    """Per-image L1 normalisation scaled to mean |g| = 1: ``g * N / ||g||_1`` (AoA's step direction)."""
    return g / g.abs().flatten(1).mean(1).clamp(min=1e-12).view(-1, *([1] * (g.dim() - 1)))


def gaussian_kernel(size: int, nsig: float = 3.0) -> torch.Tensor:
    """TI kernel: a ``size x size`` Gaussian spanning ``nsig`` standard deviations each side (as the TI code)."""
    t = torch.linspace(-nsig, nsig, size)
    g = torch.exp(-0.5 * t**2)
    k = torch.outer(g, g)
    return k / k.sum()


def runner_up(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The top class other than the true one (y2 in AoA)."""
    return logits.detach().scatter(1, labels[:, None], float("-inf")).argmax(1)


class Attack:
    """Base class. Subclasses set ``name``, ``step_rule`` (``"sign"`` or ``"l1"``) and implement :meth:`objective`."""

    name = "attack"
    step_rule = "sign"
    memory_factor = 3.0  # peak bytes of one copy's gradient / its forward activation bytes (attacks.memory)
    conventions: dict = {}  # SGLRP conventions of the recorded attention (default: the authors')

    def __init__(self, model: torch.nn.Module, config: AttackConfig | None = None, **overrides):
        self.model = model
        self.config = replace(config or self.default_config(), **overrides)
        device = next(model.parameters()).device  # auto precision: decided by the device the model is on
        self.config = replace(self.config, precision=resolve_precision(self.config.precision, device))
        self.sglrp = self._attention(model)

    def _attention(self, model: torch.nn.Module) -> SGLRP | None:
        """Attention is recorded for every attack whose surrogate SGLRP can explain."""
        try:
            return SGLRP(model, **self.conventions)
        except UnsupportedLayerError:
            return None

    @classmethod
    def default_config(cls) -> AttackConfig:
        return AttackConfig()

    @property
    def config_hash(self) -> str:
        return self.config.digest(self.name)

    def objective(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-image value the attack increases, for (transformed) [0,1] images ``x``."""
        raise NotImplementedError

    def describe(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image surrogate state recorded before and after the attack."""
        with torch.no_grad():
            if self.sglrp is None:
                logits = self.model(x)
            else:
                logits = self.sglrp(x)
                h = self.sglrp.heatmaps(logits, [labels, runner_up(logits, labels)]).flatten(2).sum(2)
            p = logits.float().softmax(1)
        out = {"pred": p.argmax(1), "p_true": p.gather(1, labels[:, None]).squeeze(1)}
        if self.sglrp is not None:  # attention ratio ||h(x,y)||_1 / ||h(x,y2)||_1: AoA drives it down
            out["attention_ratio"] = h[0] / h[1].clamp(min=1e-12)
        return out

    # ---- shared mechanics ---------------------------------------------------------------------------------

    def _diverse(self, h: int, w: int, gen: torch.Generator):
        """DI, drawn once per gradient: with probability exactly ``di``, a transform that resizes to a random 90-99%
        size and zero-pads back at a random place; otherwise the identity."""
        if self.config.di <= 0 or torch.rand(1, generator=gen).item() >= self.config.di:
            return lambda x: x
        size = int(torch.randint(int(h * 0.9), h, (1,), generator=gen))  # always smaller: every draw transforms
        top, left = (int(v) for v in torch.randint(0, h - size + 1, (2,), generator=gen))
        return lambda x: F.pad(F.interpolate(x, size=(size, size), mode="nearest"),
                               (left, w - size - left, top, h - size - top))

    @property
    def copies_per_image(self) -> int:
        """Copies of each image one gradient passes through the model (what ``sub_batch`` divides)."""
        return self.config.si

    def input_copies(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed copies of ``x`` whose gradients are averaged, stacked copy after copy, and each copy's
        weight: SI's scale copies x/2^i (with ``si_x_twice`` the unscaled copy gets a double share instead of a
        second identical computation). Input-transformation attacks (Admix, BSR) make other copies."""
        return torch.cat([x / 2**i for i in range(self.config.si)]), self.config.copy_weights()

    def copy_transform(self, x: torch.Tensor, copies: int, gen: torch.Generator
                       ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The transform applied inside the gradient (so the gradient is taken through it, in the image's layout) to
        the stacked copies' rows ``start, start + 1, ...``: DI, one draw per gradient. BSR draws one per copy."""
        diverse = self._diverse(*x.shape[-2:], gen)
        return lambda part, start: diverse(part)

    def gradient(self, x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Objective gradient with the input copies, their transform (DI) and TI applied and the copies combined as
        the step rule needs (module doc)."""
        cfg = self.config
        copies, weights = self.input_copies(x, gen)
        m = len(weights)
        copies, copy_labels = copies.detach(), labels.repeat(m)
        transform = self.copy_transform(x, m, gen)
        chunk = cfg.sub_batch or len(copies)
        grads = []
        for start in range(0, len(copies), chunk):  # the objective is per image
            part = copies[start:start + chunk].detach().requires_grad_()
            with forward_precision(cfg.precision, x.device.type):
                value = self.objective(transform(part, start), copy_labels[start:start + chunk]).float().sum()
                grads.append(torch.autograd.grad(value, part)[0])
        g = torch.cat(grads).float()
        if cfg.ti:
            k = gaussian_kernel(cfg.ti).to(g)
            g = F.conv2d(g, k.expand(g.shape[1], 1, -1, -1), padding=cfg.ti // 2, groups=g.shape[1])
        if self.step_rule == "l1":
            g = unit_mean_abs(g)
        weights = weights.to(g).view(m, *([1] * x.dim()))
        return (g.view(m, *x.shape) * weights).sum(0)

    def begin(self, x0: torch.Tensor) -> None:
        """Called once per batch before the first step (state an attack keeps across steps starts here)."""

    def tuned(self, g: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
              gen: torch.Generator) -> torch.Tensor:
        """The gradient the momentum accumulates, from this step's gradient ``g`` at the active images ``x``
        (``idx`` in the batch); VMI adds the previous step's gradient variance."""
        return g

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        if self.step_rule == "sign":
            return g.sign()
        return unit_mean_abs(g) if self.config.mi else g  # a momentum sum is rescaled to a step of size alpha

    def _fit_budget(self, x0: torch.Tensor, x_prev: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """The furthest point on the segment x_prev -> x_new whose rounded RMSD is within ``eta`` (bisection)."""
        eta = self.config.eta * 255
        lo = torch.zeros(len(x0), device=x0.device)
        hi = torch.ones(len(x0), device=x0.device)
        for _ in range(20):
            mid = (lo + hi) / 2
            ok = rmsd(quantize_within(x_prev + mid.view(-1, 1, 1, 1) * (x_new - x_prev), x0, self.config.eps), x0) <= eta
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        # lo=0 (x_prev, already within budget) is always feasible
        return quantize_within(x_prev + lo.view(-1, 1, 1, 1) * (x_new - x_prev), x0, self.config.eps)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int | None = None,
                 on_step: Callable[[int, int], None] | None = None):
        """Attack a batch of [0,1] images; returns (uint8-grid adversarial images, list of per-image records).

        ``on_step(step, still_active)`` is called after every step (progress; an exception it raises stops the
        attack between steps)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        x0 = quantize(images.detach())
        x = x0.clone()
        active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        steps = torch.zeros(len(x0), dtype=torch.long)
        momentum = torch.zeros_like(x0)
        before = self.describe(x0, labels)
        self.begin(x0)
        for step in range(1, cfg.max_steps + 1):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            g = self.tuned(self.gradient(x[idx], labels[idx], gen), x[idx], labels[idx], idx, gen)
            if cfg.mi:  # Dong et al.: accumulate L1-normalised gradients
                momentum[idx] = cfg.mi * momentum[idx] + unit_mean_abs(g)
                g = momentum[idx]
            x_new = (x[idx] + cfg.alpha * self._direction(g)).clamp(0, 1)
            x_new = x0[idx] + (x_new - x0[idx]).clamp(-cfg.eps, cfg.eps)
            over = rmsd(quantize_within(x_new, x0[idx], cfg.eps), x0[idx]) > cfg.eta * 255
            if over.any():
                o = idx[over]
                x_new[over] = self._fit_budget(x0[o], x[o], x_new[over])
                active[o] = False
            x[idx] = x_new.detach()
            steps[idx.cpu()] += 1
            if on_step:
                on_step(step, int(active.sum()))
        x = quantize_within(x, x0, cfg.eps)
        after = self.describe(x, labels)
        dist = rmsd(x, x0)
        linf = (x - x0).flatten(1).abs().amax(1) * 255
        records = []
        for i in range(len(x)):
            rec = {
                "attack": self.name,
                "config_hash": self.config_hash,
                "precision": self.config.precision,
                "steps": int(steps[i]),
                "rmsd": round(float(dist[i]), 4),
                "linf": round(float(linf[i]), 4),
            }
            for when, d in (("before", before), ("after", after)):
                for k, v in d.items():
                    val = v[i].item()
                    rec[f"{k}_{when}"] = round(val, 6) if isinstance(val, float) and math.isfinite(val) else val
            records.append(rec)
        return x, records
