"""One interface for OOD fine-tuning: a loss on an in-distribution batch and an auxiliary-outlier batch.

``progress`` (0 -> 1 over the run) lets a method switch terms on partway (OrthLoss does at one half).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from training.ood.features import features_and_logits


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax to the uniform distribution, per sample (OE's outlier term)."""
    return -logits.log_softmax(1).mean(1)


class OODMethod:
    name = "base"
    score = "msp"  # the score this method is meant to be read with (every score is reported)

    def __init__(self, oe_weight: float = 0.5):
        self.oe_weight = oe_weight
        self.progress = 0.0

    def loss(self, model: nn.Module, x_id: torch.Tensor, y_id: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        feats, logits = features_and_logits(model, torch.cat([x_id, x_out]))
        n = len(x_id)
        return self.terms(model, feats[:n], logits[:n], y_id, feats[n:], logits[n:])

    def terms(self, model, f_id, z_id, y_id, f_out, z_out) -> torch.Tensor:
        raise NotImplementedError
