"""Energy-based OE (Liu et al., 2020): CE on ID plus squared hinges on the free energy ``E = -logsumexp(z)``,
pushing ID energy below ``m_in`` and outlier energy above ``m_out`` (CIFAR values: -25, -7, weight 0.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.ood.base import OODMethod


class EnergyOE(OODMethod):
    name = "energy-oe"
    score = "energy"

    def __init__(self, m_in: float = -25.0, m_out: float = -7.0, weight: float = 0.1):
        super().__init__()
        self.m_in, self.m_out, self.weight = m_in, m_out, weight

    def terms(self, model, f_id, z_id, y_id, f_out, z_out):
        e_id, e_out = -torch.logsumexp(z_id, 1), -torch.logsumexp(z_out, 1)
        hinge = F.relu(e_id - self.m_in).pow(2).mean() + F.relu(self.m_out - e_out).pow(2).mean()
        return F.cross_entropy(z_id, y_id) + self.weight * hinge
