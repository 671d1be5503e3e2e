"""OOD scores, higher = more in-distribution: MSP, energy (negative free energy), max logit, and OrthLoss's
MSP + sum_k |cos(f, w_k)| (an ID feature lies along its class weight; OrthLoss trains outlier features to be
orthogonal to every class weight, so they score low)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def msp(logits: torch.Tensor, feats: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    return logits.softmax(1).max(1).values


def energy(logits: torch.Tensor, feats=None, weights=None, temperature: float = 1.0) -> torch.Tensor:
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def max_logit(logits: torch.Tensor, feats=None, weights=None) -> torch.Tensor:
    return logits.max(1).values


def cosine_to_classes(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``cos(f, w_k)`` for every sample and class (samples x classes)."""
    return F.normalize(feats, dim=1) @ F.normalize(weights, dim=1).T


def orthloss(logits: torch.Tensor, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return msp(logits) + cosine_to_classes(feats, weights).abs().sum(1)


SCORES = {"msp": msp, "energy": energy, "max_logit": max_logit, "orthloss": orthloss}
