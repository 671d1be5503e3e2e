"""Adversarial-training methods by name: ``create_method("n-fgsm", eps=8/255)``."""

from __future__ import annotations

from training.adversarial.base import AdvTrainMethod
from training.adversarial.fgsm import FGSM, FGSMRandomStart
from training.adversarial.grad_align import GradAlign
from training.adversarial.n_fgsm import NFGSM
from training.adversarial.pgd_at import PGDAT

METHODS: dict[str, type[AdvTrainMethod]] = {m.name: m for m in (FGSM, FGSMRandomStart, NFGSM, GradAlign, PGDAT)}


def create_method(name: str, eps: float, **kwargs) -> AdvTrainMethod:
    if name not in METHODS:
        raise ValueError(f"unknown adversarial-training method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name](eps, **kwargs)
