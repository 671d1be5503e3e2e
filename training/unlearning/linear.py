"""The exact-unlearning check behind MUSO, in an over-parameterised linear model on random features.

Gradient descent on the squared loss from ``w`` converges to the interpolant closest to ``w``. Train from ``w0``
on all data, then fine-tune on the remaining data plus the forget data relabelled with MUSO's labels: the result
equals retraining from ``w0`` on the remaining data alone. Relabelling at random, or not fine-tuning on the forget
set at all, leaves a gap.
"""

from __future__ import annotations

import torch

from training.unlearning.muso import optimal_forget_labels


def gradient_descent(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    """Full-batch GD on 1/2 ||z w - y||^2 with step 1 / largest eigenvalue of z^T z."""
    lr = 1.0 / torch.linalg.matrix_norm(z, ord=2) ** 2
    for _ in range(steps):
        w = w - lr * z.T @ (z @ w - y)
    return w


def exact_unlearning_check(n: int = 60, p: int = 600, forget: int = 12, steps: int = 4000, seed: int = 0
                           ) -> dict[str, float]:
    """Relative distance to the retrained weights after fine-tuning with MUSO labels, random labels, and on the
    remaining data only (no relabelling)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, p, generator=gen, dtype=torch.float64) / p**0.5
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(p, generator=gen, dtype=torch.float64)
    zu, zr, yr = z[:forget], z[forget:], y[forget:]
    original = gradient_descent(z, y, w0, steps)
    retrained = gradient_descent(zr, yr, w0, steps)

    def distance(w):
        return ((w - retrained).norm() / retrained.norm()).item()

    muso_labels = optimal_forget_labels(zu, zr, yr, w0, eps=0.0)
    random_labels = torch.randn(forget, generator=gen, dtype=torch.float64)
    return {
        "muso_labels": distance(gradient_descent(z, torch.cat([muso_labels, yr]), original, steps)),
        "random_labels": distance(gradient_descent(z, torch.cat([random_labels, yr]), original, steps)),
        "no_relabelling": distance(gradient_descent(zr, yr, original, steps)),
    }
