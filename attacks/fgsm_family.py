"""Baseline transfer attacks at the same budget as AoA: PGD (iterative FGSM from the clean image), MI-FGSM
(Dong et al. 2018), DI-FGSM (Xie et al. 2019), TI-FGSM (Dong et al. 2019) and SI-FGSM (Lin et al. 2020).

They share one objective (cross-entropy on the true class) and the sign step; they differ only in the gradient
tricks of :class:`attacks.base.Attack`, so each is a registered preset rather than a near-copy. At an RMSD budget
the start is the clean image (no random start): a random start would spend budget on noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attacks.base import Attack
from attacks.registry import register_attack


@register_attack("si-fgsm", si=4)
@register_attack("ti-fgsm", ti=5)
@register_attack("di-fgsm", di=0.5)
@register_attack("mi-fgsm", mi=1.0)
@register_attack("pgd")
class CrossEntropyAttack(Attack):
    step_rule = "sign"

    def objective(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x).float(), labels, reduction="none")
