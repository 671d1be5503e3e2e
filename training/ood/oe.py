"""Outlier Exposure (Hendrycks et al., 2019)."""

from __future__ import annotations

import torch.nn.functional as F

from training.ood.base import OODMethod, uniform_cross_entropy


class OutlierExposure(OODMethod):
    """OE (Hendrycks et al., 2019): CE on ID plus ``oe_weight`` x cross-entropy to uniform on outliers."""

    name = "oe"

    def terms(self, model, f_id, z_id, y_id, f_out, z_out):
        return F.cross_entropy(z_id, y_id) + self.oe_weight * uniform_cross_entropy(z_out).mean()
