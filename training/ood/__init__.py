"""OOD fine-tuning methods by name (``oe``, ``energy-oe``, ``orthloss``) and the scores they are read with."""

from __future__ import annotations

from training.ood.base import OODMethod
from training.ood.energy_oe import EnergyOE
from training.ood.oe import OutlierExposure
from training.ood.orthloss import OrthLoss
from training.ood.scores import SCORES

METHODS: dict[str, type[OODMethod]] = {m.name: m for m in (OutlierExposure, EnergyOE, OrthLoss)}


def create_method(name: str, **kwargs) -> OODMethod:
    if name not in METHODS:
        raise ValueError(f"unknown OOD fine-tuning method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name](**kwargs)


__all__ = ["METHODS", "SCORES", "create_method"]
