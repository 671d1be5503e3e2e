"""Watching an adversarial-training run: robustness checks, self-fitting proxies, catastrophic-overfitting (CO)
detection and the response to it.

CO: multi-step (PGD) robust accuracy collapses within a few iterations while single-step (FGSM) accuracy rises.
The self-fitting account says the network learns the *self-information* carried by the single-step
perturbation, visible as *channel differentiation*. Their exact metrics are unpublished, so two measurable
**proxies** stand in for them, named as such everywhere:
- ``self_info_acc_proxy``: accuracy on the FGSM perturbation alone, added to a neutral grey image, scored
  against the label it was crafted for;
- ``channel_share_*_proxy``: the share of activation mass (mean |a| per channel) held by the top 10% of channels
  of early conv layers, on FGSM inputs and on clean inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.adversarial.base import input_gradient, linf_pgd


def top_channel_share(activation: torch.Tensor, top_fraction: float = 0.1) -> float:
    """Share of the activation mass (mean |a| over batch and space, per channel) in the top ``top_fraction`` of
    channels (at least one): 0.1 for equal channels at 10%, 1.0 when one channel holds everything."""
    mass = activation.detach().abs().transpose(0, 1).flatten(1).mean(1)
    k = max(1, math.ceil(top_fraction * mass.numel()))
    return (mass.topk(k).values.sum() / mass.sum().clamp_min(1e-12)).item()


def early_conv_layers(model: nn.Module, count: int = 2) -> list[str]:
    """Names of the first ``count`` convolution layers (in module order)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:count]


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def channel_shares(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, float]:
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"channel monitor: no layer named {missing} (conv layers: {early_conv_layers(model, 8)})")
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: top_channel_share(captured[n]) for n in layers}


def robustness_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, pgd_steps: int,
                     layers: list[str] | None = None, seed: int = 0) -> dict[str, float]:
    """PGD-k and FGSM accuracy, their gap and perturbation cosine, and (with ``layers``) the two proxies."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    fgsm_sign = input_gradient(model, x, y).sign()
    d_fgsm = (x + eps * fgsm_sign).clamp(0, 1) - x
    d_pgd = linf_pgd(model, x, y, eps, eps / 4, pgd_steps, random_start=True, gen=gen)
    out = {
        "clean_acc": _accuracy(model, x, y),
        "fgsm_acc": _accuracy(model, x + d_fgsm, y),
        "pgd_acc": _accuracy(model, x + d_pgd, y),
        "fgsm_pgd_cos": F.cosine_similarity(d_fgsm.flatten(1), d_pgd.flatten(1), dim=1, eps=1e-12).mean().item(),
    }
    out["fgsm_pgd_gap"] = out["fgsm_acc"] - out["pgd_acc"]
    if layers:
        # the FGSM perturbation before clamping to the image's range, on grey: what the network could read from it
        out["self_info_acc_proxy"] = _accuracy(model, 0.5 + eps * fgsm_sign, y)
        fgsm_shares, clean_shares = channel_shares(model, layers, x + d_fgsm), channel_shares(model, layers, x)
        out["channel_share_fgsm_proxy"] = sum(fgsm_shares.values()) / len(layers)
        out["channel_share_clean_proxy"] = sum(clean_shares.values()) / len(layers)
    model.train(was_training)
    return out


@dataclass
class CODetector:
    """Catastrophic overfitting on the training batch, judged against the running peak (as Wong et al.'s early stop
    judges against the best PGD accuracy so far): PGD accuracy has lost at least ``drop`` of its peak and at least
    ``min_drop`` points, a collapse spread over several checks included, while FGSM accuracy has fallen by less
    than half as much (the model still resists FGSM: CO's signature; a fall of both, e.g. a learning-rate spike,
    is not CO). It fires once per collapse: the peak restarts from the collapsed level, and the detector re-arms once
    PGD accuracy has recovered ``min_drop`` points (after a rollback, at the next check). ``min_peak``: a peak
    below this PGD accuracy is no robust level to collapse from (early checks near chance wobble by more than
    ``min_drop``)."""

    drop: float = 0.5
    min_drop: float = 5.0
    min_peak: float = 0.0
    peak: dict[str, float] | None = None  # the check with the highest PGD accuracy since the last event
    floor: float | None = None  # PGD accuracy at the last event: disarmed until it recovers min_drop above it

    def update(self, current: dict[str, float]) -> dict[str, float] | None:
        """The peak check when ``current`` is a collapse, else None."""
        pgd = current["pgd_acc"]
        if self.floor is not None and pgd >= self.floor + self.min_drop:
            self.floor = None
        if self.peak is None or pgd > self.peak["pgd_acc"]:
            self.peak = dict(current)
            return None
        pgd_fall = self.peak["pgd_acc"] - pgd
        fgsm_fall = self.peak["fgsm_acc"] - current["fgsm_acc"]
        if self.floor is None and self.peak["pgd_acc"] >= self.min_peak \
                and pgd_fall >= max(self.min_drop, self.drop * self.peak["pgd_acc"]) \
                and fgsm_fall < pgd_fall / 2:
            peak, self.peak, self.floor = self.peak, dict(current), pgd
            return peak
        return None


@dataclass
class COMonitor:
    """Called after every optimiser step; checks every ``every`` steps on a fixed training batch and a fixed
    validation subset, detects CO on the training batch, and by option (``response: rollback``) rolls back to the
    checkpoint of the most robust check so far (model and optimiser state) and scales the attack step down; a
    rolled-back run that ends below that check ends on its weights (``keep_robust``)."""

    method: Any  # the AdvTrainMethod being trained (its step_scale is the knob of the response)
    train_batch: tuple[torch.Tensor, torch.Tensor]
    val_batch: tuple[torch.Tensor, torch.Tensor]
    eps: float
    every: int
    pgd_steps: int = 10
    detector: CODetector = field(default_factory=CODetector)
    response: str = "log"  # log | rollback
    step_factor: float = 1.0  # multiply the attack step by this on rollback (1.0: keep it)
    layers: list[str] = field(default_factory=list)
    on_event: Callable[[dict[str, Any]], None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _best: dict[str, Any] | None = None  # with rollback: the checkpoint of the highest training PGD accuracy
    _last_pgd: float | None = None

    def __post_init__(self):
        if self.response not in ("log", "rollback"):
            raise ValueError(f"CO response must be 'log' or 'rollback', got {self.response!r}")

    def check(self, step: int, model: nn.Module) -> tuple[dict[str, Any], dict[str, float]]:
        train = robustness_check(model, *self.train_batch, self.eps, self.pgd_steps, self.layers, seed=step)
        val = robustness_check(model, *self.val_batch, self.eps, self.pgd_steps, None, seed=step)
        row = {"step": step, **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
               "attack_step": self.method.step, "co": 0}
        return row, train

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step % self.every:
            return
        row, current = self.check(step, model)
        peak = self.detector.update(current)
        self._last_pgd = current["pgd_acc"]
        if self.response == "rollback" and (self._best is None or current["pgd_acc"] > self._best["pgd_acc"]):
            # the robust model a rollback returns to: the best check, not the last before the alarm (a slow
            # collapse has lost most of it by then), nor a peak of the recovery after a rollback
            self._best = {**snapshot(step, model, optimizer), "pgd_acc": current["pgd_acc"]}
        if peak is not None:
            row["co"] = 1
            event = {"step": step, "pgd_acc_peak": peak["pgd_acc"], "pgd_acc": current["pgd_acc"],
                     "fgsm_acc_at_peak": peak["fgsm_acc"], "fgsm_acc": current["fgsm_acc"],
                     "response": self.response}
            if self.response == "rollback":
                restore(model, optimizer, self._best)
                self.method.step_scale *= self.step_factor
                event.update(restored_step=self._best["step"], new_attack_step=self.method.step)
            self.events.append(event)
            if self.on_event:
                self.on_event(event)
        self.history.append(row)

    def keep_robust(self, model: nn.Module) -> int | None:
        """After training: a rolled-back run whose last check is below its best ends on the best check's weights
        (Wong et al.'s early stop, here only once CO was seen); returns that check's step, else None."""
        if self.response != "rollback" or not self.events or self._last_pgd >= self._best["pgd_acc"]:
            return None
        model.load_state_dict(self._best["model"])
        return self._best["step"]


def snapshot(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"step": step, "model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
