"""LoRA adapters for timm models, and Flat-LoRA's random weight perturbation (Li et al., 2024).

``add_lora`` swaps every ``nn.Linear`` / ``nn.Conv2d`` for a ``LoRALayer`` that keeps the original weight frozen
and computes the merged weight ``W + (alpha / r) B A`` in the forward pass (B starts at zero, so an adapted model
starts equal to the original). Flat-LoRA perturbs that *merged* weight during training with Gaussian noise whose
standard deviation per output row is ``sigma * ||row|| / sqrt(fan_in)``; ``sigma`` ramps up along a cosine and the
noise of step t is regenerated from ``(seed, layer, t)`` rather than stored. The perturbation lives only in the
forward pass: the frozen weights are never written, and A and B are never perturbed directly. ``merge_lora``
folds the adapters back into plain layers for the evaluate stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALayer(nn.Module):
    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, index: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_features, fan_in = base.weight.shape[0], base.weight[0].numel()
        self.fan_in, self.scale, self.index = fan_in, alpha / rank, index
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA/peft: A random, B zero
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.sigma, self.noise_seed = 0.0, 0

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.scale * self.lora_B @ self.lora_A).view_as(self.base.weight)

    def perturbation(self, weight: torch.Tensor) -> torch.Tensor:
        """Noise for the current step: per output row N(0, (sigma ||row|| / sqrt(fan_in))^2), from ``noise_seed``."""
        gen = torch.Generator().manual_seed(self.noise_seed)
        std = self.sigma * weight.detach().flatten(1).norm(dim=1) / math.sqrt(self.fan_in)
        noise = torch.randn(weight.shape, generator=gen, dtype=weight.dtype).to(weight.device)
        return noise * std.view(-1, *[1] * (weight.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.merged_weight()
        if self.training and self.sigma > 0:
            w = w + self.perturbation(w)
        if isinstance(self.base, nn.Linear):
            return F.linear(x, w, self.base.bias)
        b = self.base
        return F.conv2d(x, w, b.bias, b.stride, b.padding, b.dilation, b.groups)


def add_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0) -> list[LoRALayer]:
    """Wrap every Linear/Conv2d of ``model`` (in place) and freeze everything but the adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if not targets:
        raise ValueError(f"{type(model).__name__}: no Linear or Conv2d layer to adapt")
    layers = []
    for i, (name, module) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        layer = LoRALayer(module, rank, alpha, i)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    return layers


class FlatLoRANoise:
    """Training callback: before each step set ``sigma_t = sigma * (1 - cos(pi t / T)) / 2`` and the step's seeds."""

    def __init__(self, layers: list[LoRALayer], sigma: float, total_steps: int, seed: int = 0):
        self.layers, self.sigma, self.total, self.seed = layers, sigma, total_steps, seed
        self.set_step(0)

    def sigma_at(self, step: int) -> float:
        return self.sigma * 0.5 * (1 - math.cos(math.pi * min(step, self.total) / self.total))

    def set_step(self, step: int) -> None:
        for layer in self.layers:
            layer.sigma = self.sigma_at(step)
            layer.noise_seed = (self.seed * 1_000_003 + step) * 10_007 + layer.index

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.set_step(step)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALayer by its base layer holding the merged weight (in place); returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            merged = module.base
            merged.weight.copy_(module.merged_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    return model
