"""AoA, the Attack on Attention (Chen et al., "Universal Adversarial Attack on Attention and the Resulting
Dataset DAmageNet", TPAMI 2020): move the surrogate's SGLRP attention away from the true class.

Loss (minimised): ``log||h(x, y)||_1 - log||h(x, y2(x))||_1 - lam * CE(x, y)`` with ``y2`` the current top other
class, recomputed every step; L1-normalised steps (no sign). Defaults are the authors' code: SI over x, x, x/2, x/4,
x/8 with the step ``alpha`` times the mean of the copies' L1-normalised gradients (not normalised again), z^B bounds
from each image's own min/max (``bounds="image"``), ReLU per colour channel before summing the map (``relu=
"channel"``), ``lam = 1``, relevance pass in fp32. The RMSD budget, L-inf projection and records come from
:class:`attacks.base.Attack`.

Where a map's ReLU leaves nothing (``||h||_1 = 0``: the class has no positive attention left), the authors' loss
``log(mean(h_y) / mean(h_y2))`` is infinite, its direction NaN, and their loop stops that image (``if
isnan(direction): break``). Here the norm is clamped at 1e-12: that term then has no gradient, and the step
follows the rest of the objective until the budget stops it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from attacks.base import Attack, AttackConfig, runner_up
from attacks.precision import forward_precision
from attacks.registry import register_attack
from attacks.sglrp import SGLRP


@register_attack("aoa")
class AoA(Attack):
    step_rule = "l1"
    memory_factor = 12.0  # the relevance pass and the gradient through it (measured 12.0 on VGG19, bench_memory.py)

    def __init__(self, model, config=None, lam: float = 1.0, explicit: bool = True, bounds: str = "image",
                 relu: str = "channel", inactive_pool: str = "spread", **overrides):
        """``lam`` weighs the cross-entropy term (1 in the authors' code); ``explicit=False`` takes the reference
        (double-backward) gradient path instead of the explicit relevance pass; ``bounds``, ``relu`` and
        ``inactive_pool`` are the SGLRP conventions (:class:`attacks.sglrp.SGLRP`)."""
        self.conventions = {"bounds": bounds, "relu": relu, "inactive_pool": inactive_pool}
        self.lam, self.explicit = lam, explicit
        super().__init__(model, config, **overrides)

    def _attention(self, model):
        return SGLRP(model, **self.conventions)  # AoA needs it: raises the UnsupportedLayerError naming the layer

    @classmethod
    def default_config(cls) -> AttackConfig:
        return AttackConfig(si=4, si_x_twice=True)

    @property
    def config_hash(self) -> str:
        return self.config.digest(self.name, {"lam": self.lam, **self.conventions})

    def objective(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.sglrp(x)
        h = self.sglrp.heatmaps(logits, [labels, runner_up(logits, labels)], explicit=self.explicit)
        norms = h.flatten(2).sum(2).float().clamp(min=1e-12).log()
        loss = norms[0] - norms[1] - self.lam * F.cross_entropy(logits.float(), labels, reduction="none")
        return -loss


def policy_error(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, policy: str, **sglrp_options) -> dict:
    """AoA's heat maps and gradient under precision ``policy`` (:mod:`attacks.precision`) against an fp64 copy of
    ``model``: the maps' worst relative L1 error (the true class and the runner-up, as AoA picks it) and the worst
    cosine between the gradients over the images of ``x``."""
    with torch.no_grad():
        second = runner_up(model(x), labels)

    def run(m, xx, p):
        attack = AoA(m, AttackConfig(si=1, precision=p), **sglrp_options)
        xx = xx.detach().clone().requires_grad_()
        with forward_precision(p, xx.device.type):
            logits = attack.sglrp(xx)
            maps = attack.sglrp.heatmaps(logits, [labels, second])
            norms = maps.flatten(2).sum(2).float().clamp(min=1e-12).log()
            (grad,) = torch.autograd.grad((norms[0] - norms[1]).sum(), xx)
        return maps.detach().double(), grad.double()

    ref_maps, ref_grad = run(copy.deepcopy(model).double(), x.double(), "fp32")
    maps, grad = run(model, x, policy)
    err = ((maps - ref_maps).abs().flatten(2).sum(2) / ref_maps.flatten(2).sum(2).clamp(min=1e-30)).amax()
    cos = torch.nn.functional.cosine_similarity(grad.flatten(1), ref_grad.flatten(1), dim=1).amin()
    return {"policy": policy, "map_rel_error": float(err), "grad_cosine": float(cos)}
