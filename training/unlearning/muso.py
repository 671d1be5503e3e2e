"""MUSO: unlearning by relabelling the forget set with the labels that make fine-tuning land on the retrained
model (exact in over-parameterised linear models, see ``linear.py``).

Linear theory: with random features ``Z`` and initial weights ``w0``, the optimal forget labels are
``y_u = Z_u w0 + Z_u Z_r^T (Z_r Z_r^T + eps I)^-1 (y_r - Z_r w0)``, i.e. the retrained model's predictions.
For networks the penultimate features play the random features, with a head re-fitted from ``w0 = 0`` to the
one-hot remaining labels; the predicted class scores, clipped at 0 and normalised, are the forget set's soft
labels. Relabelling (on the current features) alternates with fine-tuning on remaining + relabelled data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.ood.features import features_and_logits
from training.unlearning.base import UnlearningMethod


def optimal_forget_labels(z_forget: torch.Tensor, z_remain: torch.Tensor, y_remain: torch.Tensor,
                          w0: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """MUSO's relabelling in closed form (float64): ``Z_u w0 + Z_u Z_r^T (Z_r Z_r^T + eps I)^-1 (y_r - Z_r w0)``."""
    zu, zr, yr = z_forget.double(), z_remain.double(), y_remain.double()
    if w0 is None:
        w0 = torch.zeros(zr.shape[1], *yr.shape[1:], dtype=torch.float64)
    n, d = zr.shape
    if eps > 0 and d < n:  # same value through Z_r^T (Z_r Z_r^T + eps I)^-1 = (Z_r^T Z_r + eps I)^-1 Z_r^T: a d x d solve
        return zu @ w0 + zu @ torch.linalg.solve(zr.T @ zr + eps * torch.eye(d, dtype=torch.float64), zr.T @ (yr - zr @ w0))
    gram = zr @ zr.T + eps * torch.eye(n, dtype=torch.float64)
    return zu @ w0 + zu @ zr.T @ torch.linalg.solve(gram, yr - zr @ w0)


@torch.no_grad()
def penultimate(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    feats = [features_and_logits(model, images[i : i + batch_size].float().div(255))[0]
             for i in range(0, len(images), batch_size)]
    f = torch.cat(feats)
    return torch.cat([f, torch.ones(len(f), 1)], 1)  # a bias feature


class MUSO(UnlearningMethod):
    name = "muso"
    rounds = 2
    ridge = 1e-3  # eps of the closed form, relative to the mean feature energy (the network's features are not
    # over-parameterised for thousands of remaining samples, so the solve needs a ridge)

    def soft_labels(self, model, data) -> torch.Tensor:
        (xf, _), (xr, yr) = data.forget, data.remain
        zf, zr = penultimate(model, xf), penultimate(model, xr)
        eps = self.ridge * zr.pow(2).sum(1).mean().item()
        scores = optimal_forget_labels(zf, zr, F.one_hot(yr, data.num_classes).double(), eps=eps).float().clamp_min(0)
        total = scores.sum(1, keepdim=True)
        uniform = torch.full_like(scores, 1 / data.num_classes)
        return torch.where(total > 1e-6, scores / total.clamp_min(1e-6), uniform)

    def unlearn(self, model, data):
        (xf, _), (xr, yr) = data.forget, data.remain
        epochs = self.recipe.get("epochs", 2)
        per_round = max(1, epochs // self.rounds)
        remain_targets = F.one_hot(yr, data.num_classes).float()
        for _ in range(self.rounds):
            targets = torch.cat([self.soft_labels(model, data), remain_targets])
            self.fine_tune(model, torch.cat([xf, xr]), targets, epochs=per_round)
