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

    def __init__(self, eps: float, alpha: float | None = None, seed: int = 0, clamp_start: bool = True,
                 grey_noise: bool = False):
        if eps <= 0:
            raise ValueError(f"{self.name}: eps must be > 0, got {eps}")
        self.eps = eps
        self.clamp_start, self.grey_noise = clamp_start, grey_noise
        self.alpha = self.default_alpha(eps) if alpha is None else alpha
        self.step_scale = 1.0
        self.gen = torch.Generator().manual_seed(seed)

    def default_alpha(self, eps: float) -> float:
        return eps

    @property
    def step(self) -> float:
        return self.alpha * self.step_scale

    def uniform(self, x: torch.Tensor, bound: float) -> torch.Tensor:
        """U(-bound, bound) per value, or (``grey_noise``) one draw per pixel shared by the channels: grey images
        stored as RGB get the noise a one-channel network would see (a network that averages the channels would
        otherwise see the mean of three draws, a third of the variance)."""
        shape = (x.shape[0], 1, *x.shape[2:]) if self.grey_noise else x.shape
        return ((torch.rand(shape, generator=self.gen) * 2 - 1).to(x.device) * bound).expand(x.shape)

    def start_noise(self, x: torch.Tensor, bound: float) -> torch.Tensor:
        """U(-bound, bound) noise, clamped so that ``x + start`` stays an image (``clamp_start``, as the CIFAR-10 codes
        of Wong et al. and de Jorge et al. do) or not (Wong et al.'s MNIST code: the gradient is taken at ``x +
        start`` as it falls). On digits, whose pixels sit at 0 or 1, the clamp drops half the noise of nearly every
        pixel and FGSM-RS behaves like FGSM: in Wong et al.'s MNIST recipe at eps 0.3, PGD-20 accuracy 3.6% with
        the clamp, 81% without (profiles/co-mnist-wong.yaml)."""
        noise = self.uniform(x, bound)
        return (x + noise).clamp(0, 1) - x if self.clamp_start else noise

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.perturb(model, x, y)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y)

    def __repr__(self) -> str:
        return (f"{self.name}(eps={self.eps * 255:.1f}/255, step={self.step * 255:.1f}/255"
                + ("" if self.clamp_start else ", start not clamped") + (", grey noise" if self.grey_noise else "") + ")")
