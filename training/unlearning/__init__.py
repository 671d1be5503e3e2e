"""Unlearning methods by name: ft, ga, rl, salun, natmu, sfr-on, muso (``create_method(name, recipe=...)``)."""

from __future__ import annotations

from training.unlearning.base import UnlearningData
from training.unlearning.ft import FineTune
from training.unlearning.ga import GradientAscent
from training.unlearning.muso import MUSO
from training.unlearning.natmu import NatMU
from training.unlearning.rl import RandomLabels
from training.unlearning.salun import SalUn
from training.unlearning.sfr_on import SFROn

METHODS = {m.name: m for m in (FineTune, GradientAscent, RandomLabels, SalUn, NatMU, SFROn, MUSO)}


def create_method(name: str, recipe: dict | None = None, seed: int = 0):
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name](recipe=recipe or {}, seed=seed)


__all__ = ["METHODS", "UnlearningData", "create_method"]
