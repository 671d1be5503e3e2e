"""One interface for adversarial-training methods: craft a perturbation for the batch, return the training loss.

Images are [0,1] NCHW and the model wrapper normalises, so ``eps`` and ``alpha`` are pixel fractions (8/255 ...).
``step_scale`` lets the catastrophic-overfitting response shrink the step without rebuilding the method.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """d CE(model(x), y) / dx (summed over the batch, so each sample gets its own gradient)."""
    x = x.detach().requires_grad_(True) if not x.requires_grad else x
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x, create_graph=create_graph)[0]


def linf_random_start(x: torch.Tensor, eps: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """A uniform start in the eps ball, clamped so that ``x + delta`` stays in [0,1]."""
    delta = (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * eps
    return (x + delta).clamp(0, 1) - x


def linf_step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    """One signed-gradient ascent step of ``alpha``, projected onto the eps ball and the image range."""
    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def linf_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
             random_start: bool, gen: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD perturbation ``delta`` (``x + delta`` stays in [0,1], ``|delta| <= eps``); ``steps=1`` without
    random start and ``alpha=eps`` is FGSM."""
    delta = linf_random_start(x, eps, gen) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta = linf_step(x, delta, input_gradient(model, x + delta, y), eps, alpha)
    return delta.detach()


class AdvTrainMethod:
    """Subclasses implement ``perturb``; ``loss`` adds a regulariser where the method has one."""

    name = "base"

    def __init__(self, eps: float, alpha: float | None = None, seed: int = 0):
        if eps <= 0:
            raise ValueError(f"{self.name}: eps must be > 0, got {eps}")
        self.eps = eps
        self.alpha = self.default_alpha(eps) if alpha is None else alpha
        self.step_scale = 1.0
        self.gen = torch.Generator().manual_seed(seed)

    def default_alpha(self, eps: float) -> float:
        return eps

    @property
    def step(self) -> float:
        return self.alpha * self.step_scale

    def uniform(self, x: torch.Tensor, bound: float) -> torch.Tensor:
        return (torch.rand(x.shape, generator=self.gen) * 2 - 1).to(x.device) * bound

    def start_noise(self, x: torch.Tensor, bound: float) -> torch.Tensor:
        """U(-bound, bound) noise clamped so that ``x + start`` stays an image (as Wong et al.'s code clamps it)."""
        return (x + self.uniform(x, bound)).clamp(0, 1) - x

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.perturb(model, x, y)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y)

    def __repr__(self) -> str:
        return f"{self.name}(eps={self.eps * 255:.1f}/255, step={self.step * 255:.1f}/255)"
