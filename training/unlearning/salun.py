"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to *salient* weights, those with the largest
forget-loss gradient magnitudes (the top ``share`` = 50% over the whole model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.unlearning.base import masked_gradients
from training.unlearning.rl import RandomLabels


def gradient_saliency_mask(model, images: torch.Tensor, labels: torch.Tensor, share: float = 0.5,
                           batch_size: int = 256) -> dict[str, torch.Tensor]:
    """1 for the ``share`` of weights with the largest |d forget-loss / dw| (one global threshold), else 0."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for i in range(0, len(images), batch_size):
        loss = F.cross_entropy(model(images[i : i + batch_size].float().div(255)), labels[i : i + batch_size],
                               reduction="sum")
        loss.backward()
    grads = {n: p.grad.abs() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    flat = torch.cat([g.flatten() for g in grads.values()])
    keep = torch.zeros_like(flat)
    keep[flat.topk(max(1, int(round(share * flat.numel())))).indices] = 1.0  # exactly the share, even among ties
    masks, start = {}, 0
    for n, g in grads.items():
        masks[n] = keep[start : start + g.numel()].view_as(g)
        start += g.numel()
    return masks


class SalUn(RandomLabels):
    name = "salun"
    share = 0.5
    any_class = True  # its code draws random labels from all classes

    def unlearn(self, model, data):
        masks = gradient_saliency_mask(model, *data.forget, self.share)
        handles = masked_gradients(model, masks)
        try:
            self.fine_tune(model, *self.relabelled(data))
        finally:
            for h in handles:
                h.remove()
