"""Supervised training: the loop every training stage uses (zoo, adversarial training, OOD fine-tuning, the
optimiser comparison). The optimiser comes by name from ``training.optimizers``; a stage changes what a step
optimises through ``objective`` and watches the run through ``callback``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model_zoo.zoo import ImageClassifier
from training.optimizers import build_optimizer, schedulable

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x in [0,1], labels) -> loss
Callback = Callable[[int, nn.Module, torch.optim.Optimizer], None]  # (steps done, model, optimiser)


@dataclass(frozen=True)
class Recipe:
    """Per-family training settings (small CNNs, MobileNets and ConvNeXts need different ones at demo scale)."""

    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 3  # random translation in pixels (reflect-padded crop); no flips: diagonal stripes are a class
    optimizer: str = "adamw"  # a name of training.optimizers (sgd, adamw, sam, fsam)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # momentum, rho, sigma, lam, base
    schedule: str = "cosine"  # cosine: linear warm-up then cosine decay | cyclic: triangle (fast AT) | constant


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``."""
    if schedule == "constant":
        return 1.0
    if schedule == "cyclic":  # linear up to the peak at mid-run, then linear down to 0 (Wong et al.'s fast AT)
        half = total / 2
        return (step + 1) / half if step < half else max(0.0, (total - step) / half)
    if schedule == "cosine":
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (cosine, cyclic or constant)")


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of uint8 NCHW ``images`` in eval mode."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size].float().div_(255)) for i in range(0, len(images), batch_size)])


def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent; ``images`` are uint8 NCHW."""
    if len(images) == 0:
        return float("nan")
    return 100.0 * (predict(model, images, batch_size).argmax(1) == labels).float().mean().item()


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    seed: int = 0,
    desc: str = "train",
    objective: Objective | None = None,
    callback: Callback | None = None,
) -> dict[str, float]:
    """Train ``model``'s trainable parameters in place on uint8 NCHW ``images``.

    ``objective`` defaults to label-smoothed cross-entropy; every optimiser is stepped through a closure, so SAM
    and F-SAM re-evaluate the same objective at the perturbed weights.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if objective is None:
        def objective(m, x, y):
            return F.cross_entropy(m(x), y, label_smoothing=recipe.label_smoothing)
    opt = build_optimizer(recipe.optimizer, model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                          model=model, **recipe.optimizer_kwargs)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(schedulable(opt), lambda s: lr_factor(recipe.schedule, s, total, warmup))
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", mininterval=5)
    model.train()
    step, loss = 0, torch.tensor(float("nan"))
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            x, y = random_shift(images[idx].float().div_(255), recipe.shift, gen), labels[idx]

            def closure(x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss = objective(model, x, y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if callback is not None:
                callback(step, model, opt)
                model.train()
    bar.close()
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "final_loss": loss.item(), "steps": step}
