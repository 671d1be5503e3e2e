"""Supervised training: the loop every training stage uses (zoo, adversarial training, OOD fine-tuning, the
optimiser comparison). The optimiser comes by name from ``training.optimizers``; a stage changes what a step
optimises through ``objective`` and watches the run through ``callback``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model_zoo.zoo import ImageClassifier
from training.optimizers import build_optimizer, schedulable
from training.recipe import Recipe

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x in [0,1], labels) -> loss
Callback = Callable[[int, nn.Module, torch.optim.Optimizer], None]  # (steps done, model, optimiser)


def lr_factor(schedule: str, step: int, total: int, warmup: float, peak: float = 0.5) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``."""
    if schedule == "constant":
        return 1.0
    if schedule == "cyclic":  # linear up to the peak (a share of the run), then linear down to 0 (Wong et al.'s fast AT)
        up = total * peak
        return (step + 1) / up if step < up else max(0.0, (total - step) / (total - up))
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


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Start index of each batch of an epoch. A last batch of fewer than max(2, batch_size / 4) images is skipped
    (it still is trained on in other epochs: the order is reshuffled): BatchNorm statistics of a handful of images
    wreck the step (450 images in batches of 64 left a 2-image batch and a model at 56-72% test accuracy where 500
    images reached 94%)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < max(2, batch_size // 4):
        starts.pop()
    return starts


def train_mode(model: nn.Module, freeze_norm: bool) -> None:
    """``model.train()``, with BatchNorm layers left in eval mode (frozen running statistics) when ``freeze_norm``."""
    model.train()
    if freeze_norm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    seed: int = 0,
    desc: str = "train",
    objective: Objective | None = None,
    callback: Callback | None = None,
    epoch_end: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters in place on uint8 NCHW ``images``.

    ``objective`` defaults to label-smoothed cross-entropy; every optimiser is stepped through a closure, so SAM
    and F-SAM re-evaluate the same objective at the perturbed weights. The result's ``history`` has one row per
    epoch (epoch, step, mean training loss, and whatever ``epoch_end(model)`` measures, in eval mode).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if objective is None:
        def objective(m, x, y):
            return F.cross_entropy(m(x), y, label_smoothing=recipe.label_smoothing)
    opt = build_optimizer(recipe.optimizer, model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                          model=model, **recipe.optimizer_kwargs)
    starts = batch_starts(len(images), recipe.batch_size)
    steps_per_epoch = len(starts)
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        schedulable(opt), lambda s: lr_factor(recipe.schedule, s, total, warmup, recipe.peak))
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", mininterval=5)
    train_mode(model, recipe.freeze_norm)
    step, loss, history = 0, torch.tensor(float("nan")), []
    for epoch in range(1, recipe.epochs + 1):
        losses = []
        order = torch.randperm(len(images), generator=gen)
        for i in starts:
            idx = order[i : i + recipe.batch_size]
            x, y = random_shift(images[idx].float().div_(255), recipe.shift, gen), labels[idx]

            def closure(x=x, y=y):
                opt.zero_grad(set_to_none=True)
                loss = objective(model, x, y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            losses.append(loss.item())
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if callback is not None:
                callback(step, model, opt)
                train_mode(model, recipe.freeze_norm)
        row = {"epoch": epoch, "step": step, "train_loss": round(sum(losses) / len(losses), 5)}
        if epoch_end is not None:
            model.eval()
            row.update(epoch_end(model))
            train_mode(model, recipe.freeze_norm)
        history.append(row)
    bar.close()
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "final_loss": loss.item(), "steps": step,
            "history": history}


def write_curve(path: str | Path, rows: list[dict[str, Any]], last: str | None = None) -> None:
    """Per-epoch or per-check rows as CSV (a DVC plot); ``last``: the column to put last, which DVC plots as y."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if k != last] + ([last] if last else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
