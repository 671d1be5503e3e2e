"""White-box robust accuracy of a trained model: L-inf PGD with random restarts, the final check of an
adversarially trained model at its own eps (Wong et al. report PGD-50 with 10 restarts, step eps/4).

An image counts as robust only if no iterate of any restart is misclassified. Every iterate lies in the eps ball
and the image range, so each one is a valid adversarial example; counting them all makes the attack stronger than
scoring the last iterate, and lets broken images leave the batch (the cost then shrinks with robust accuracy).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from training.adversarial.base import linf_random_start, linf_step


def _broken_by_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Boolean per image: misclassified at the random start or at any of ``steps`` PGD iterates."""
    broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    delta = linf_random_start(x, eps, gen)
    alive = torch.arange(len(x), device=x.device)
    for step in range(steps + 1):
        xa = (x[alive] + delta[alive]).requires_grad_(True)
        logits = model(xa)
        wrong = logits.argmax(1) != y[alive]
        broken[alive[wrong]] = True
        if step == steps:
            break
        grad = torch.autograd.grad(F.cross_entropy(logits, y[alive], reduction="sum"), xa)[0]
        keep = ~wrong
        alive, grad = alive[keep], grad[keep]
        if not len(alive):
            break
        delta[alive] = linf_step(x[alive], delta[alive], grad, eps, alpha)
    return broken


def pgd_robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 50,
                        restarts: int = 1, alpha: float | None = None, batch_size: int = 256, seed: int = 0,
                        desc: str = "white-box PGD") -> float:
    """Percent of ``(x, y)`` ([0,1] NCHW floats) still classified correctly after ``restarts`` runs of PGD-``steps``
    (step ``alpha``, default eps/4) from uniform random starts in the eps ball. Restarts attack only the images
    that survived the runs before."""
    if steps < 1 or restarts < 1:
        raise ValueError(f"white-box PGD needs steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}")
    alpha = eps / 4 if alpha is None else alpha
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    robust = 0
    try:
        for start in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", leave=False):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            survivors = torch.arange(len(xb))
            for _ in range(restarts):
                broken = _broken_by_pgd(model, xb[survivors], yb[survivors], eps, alpha, steps, gen)
                survivors = survivors[~broken]
                if not len(survivors):
                    break
            robust += len(survivors)
    finally:
        model.train(was_training)
    return 100.0 * robust / len(x)
