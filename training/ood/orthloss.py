"""OrthLoss (Neural Collapse for OOD): separate outlier features from the class-weight directions.

With ``f`` the penultimate feature and ``w_k`` the class weights (no gradient flows into the weights through
these terms): ``L_orth`` = mean over outliers of ``sum_k |cos(f, w_k)|`` (outliers orthogonal to every class) and
``L_par`` = ``-mean`` over ID of ``cos(f, w_y)`` (ID features parallel to their class). Total:
``CE + 0.5 * L_OE + L_orth + L_par``, the last two switched on at ``switch`` (one half) of the run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.ood.base import OODMethod, uniform_cross_entropy
from training.ood.features import class_weights
from training.ood.scores import cosine_to_classes


def orth_loss(f_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return cosine_to_classes(f_out, weights.detach()).abs().sum(1).mean()


def par_loss(f_id: torch.Tensor, y_id: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return -cosine_to_classes(f_id, weights.detach()).gather(1, y_id[:, None]).mean()


class OrthLoss(OODMethod):
    name = "orthloss"
    score = "orthloss"

    def __init__(self, oe_weight: float = 0.5, switch: float = 0.5):
        super().__init__(oe_weight)
        self.switch = switch

    def terms(self, model, f_id, z_id, y_id, f_out, z_out):
        loss = F.cross_entropy(z_id, y_id) + self.oe_weight * uniform_cross_entropy(z_out).mean()
        if self.progress >= self.switch:
            w = class_weights(model)
            loss = loss + orth_loss(f_out, w) + par_loss(f_id, y_id, w)
        return loss
