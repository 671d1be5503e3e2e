"""SFR-on (Fisher-saliency unlearning with fast retain / slow forget steps, online).

As the official code (``Classification/unlearn/sfron.py``, CIFAR-10 settings):
- Saliency mask over weights: ``Fisher(forget) / Fisher(remain) >= gamma`` (gamma = 1), where the diagonal
  Fisher is the mean over mini-batches of the squared gradient of the batch's mean loss (the code's estimate, not a
  per-sample one; ``fisher_batch`` 1 gives the per-sample empirical Fisher), on ``fisher_samples`` random images of
  each set (the code uses all of them).
- Every ``forget_every`` (5) iterations, first a *slow forget* step: gradient ascent on a forget batch, per-sample
  weights proportional to ``loss^-0.5`` (normalised to mean 1, so already-forgotten samples count less), strength
  ``alpha`` decaying by cosine from 25, masked to the salient weights, gradient norm clipped at 7. Then, every
  iteration, a *fast retain* step (cross-entropy on a remaining batch, all weights).
- SGD with momentum 0.9 and weight decay 5e-4; its learning rate anneals by cosine to 0 over the iterations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.optimizers import build_optimizer, schedulable
from training.unlearning.base import UnlearningMethod


def diagonal_fisher(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Mean over mini-batches (in order) of the squared gradient of the batch's mean cross-entropy (eval mode)."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    starts = range(0, len(images), batch_size)
    for i in starts:
        x, y = images[i:i + batch_size].float().div(255), labels[i:i + batch_size]
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
        for n, g in zip(params, grads):
            fisher[n] += g.pow(2)
    return {n: f / len(starts) for n, f in fisher.items()}


def fisher_saliency_mask(model, forget, remain, gamma: float = 1.0, batch_size: int = 1) -> dict[str, torch.Tensor]:
    f_forget, f_remain = diagonal_fisher(model, *forget, batch_size), diagonal_fisher(model, *remain, batch_size)
    return {n: (f_forget[n] >= gamma * f_remain[n]).float() for n in f_forget}


def schedule(iterations: int, forget_every: int = 5, alpha0: float = 25.0) -> list[tuple[bool, float]]:
    """``(forget step?, alpha)`` per iteration: forget steps at 0, 5, 10, ...; alpha = alpha0 * (1 + cos(pi t/T)) / 2."""
    return [(t % forget_every == 0, alpha0 * 0.5 * (1 + math.cos(math.pi * t / iterations))) for t in range(iterations)]


def loss_weights(losses: torch.Tensor) -> torch.Tensor:
    """Per-sample weights proportional to loss^-0.5, mean 1 (no gradient through them)."""
    w = losses.detach().clamp_min(1e-6).pow(-0.5)
    return w / w.mean()


class SFROn(UnlearningMethod):
    name = "sfr-on"
    defaults = {"iterations": 100, "lr": 1e-2, "batch_size": 64, "forget_every": 5, "alpha0": 25.0, "gamma": 1.0,
                "clip": 7.0, "fisher_samples": 256, "fisher_batch": 64, "optimizer": "sgd", "weight_decay": 5e-4,
                "optimizer_kwargs": {"momentum": 0.9}}

    def unlearn(self, model, data):
        r = self.recipe
        gen = torch.Generator().manual_seed(self.seed)
        (xf, yf), (xr, yr) = data.forget, data.remain
        pick_f = torch.randperm(len(xf), generator=gen)[: r["fisher_samples"]]
        pick_r = torch.randperm(len(xr), generator=gen)[: r["fisher_samples"]]
        masks = fisher_saliency_mask(model, (xf[pick_f], yf[pick_f]), (xr[pick_r], yr[pick_r]), r["gamma"],
                                     r["fisher_batch"])
        opt = build_optimizer(r["optimizer"], model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"],
                              **r["optimizer_kwargs"])
        lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(schedulable(opt), T_max=r["iterations"])
        model.train()
        for forget_step, alpha in schedule(r["iterations"], r["forget_every"], r["alpha0"]):
            if forget_step:
                idx = torch.randint(len(xf), (r["batch_size"],), generator=gen)
                self.forget_step(model, opt, xf[idx], yf[idx], alpha, masks)
            idx = torch.randint(len(xr), (r["batch_size"],), generator=gen)
            self.retain_step(model, opt, xr[idx], yr[idx])
            lr_schedule.step()
        model.eval()
        return masks

    def retain_step(self, model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.float().div(255)), y).backward()
        opt.step()

    def forget_step(self, model, opt, x, y, alpha, masks):
        """Weighted gradient ascent on the salient weights only, gradient norm clipped."""
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x.float().div(255)), y, reduction="none")
        (-alpha * (loss_weights(losses) * losses).mean()).backward()
        params = dict(model.named_parameters())
        for n, m in masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.recipe["clip"])
        opt.step()
