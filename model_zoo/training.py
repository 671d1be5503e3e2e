"""Supervised training from scratch: the recipe every zoo model (and later every training stage) starts from."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model_zoo.zoo import ImageClassifier


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
def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent; ``images`` are uint8 NCHW."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float().div_(255)
        correct += (model(x).argmax(1) == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def train_classifier(
    model: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    seed: int = 0,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``model`` in place on uint8 NCHW ``images``; AdamW with linear warm-up then cosine decay."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", mininterval=5)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            x = random_shift(images[idx].float().div_(255), recipe.shift, gen)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "final_loss": loss.item()}
