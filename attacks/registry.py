"""Attacks by name: ``create_attack("aoa", model, eta=7/255)``; ``list_attacks()``.

Each method's module is named here and imported when the method is first created, so the names are known (and
``params.yaml`` checked against them) without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

METHOD_MODULES = {
    "aoa": "attacks.aoa",
    "pgd": "attacks.fgsm_family",
    "mi-fgsm": "attacks.fgsm_family",
    "di-fgsm": "attacks.fgsm_family",
    "ti-fgsm": "attacks.fgsm_family",
    "si-fgsm": "attacks.fgsm_family",
    "vmi-fgsm": "attacks.vmi_fgsm",
    "admix": "attacks.admix",
    "bsr": "attacks.bsr",
}
_ATTACKS: dict[str, Callable[..., Any]] = {}


def register_attack(name: str, **preset):
    """Register a class (or a preset of it: fixed config overrides) under ``name`` (listed in METHOD_MODULES)."""

    def wrap(cls):
        def build(model, config=None, **overrides):
            attack = cls(model, config, **{**preset, **overrides})
            attack.name = name
            return attack

        build.cls, build.preset = cls, preset
        _ATTACKS[name] = build
        return cls

    return wrap


def list_attacks() -> list[str]:
    return sorted(METHOD_MODULES)


def attack_builder(name: str) -> Callable[..., Any]:
    """The registered constructor of method ``name`` (its module imported on first use)."""
    if name not in METHOD_MODULES:
        raise KeyError(f"unknown attack {name!r}; known attacks: {', '.join(list_attacks())}")
    if name not in _ATTACKS:
        importlib.import_module(METHOD_MODULES[name])
    return _ATTACKS[name]


def create_attack(name: str, model, config=None, **overrides):
    return attack_builder(name)(model, config, **overrides)


def attack_method(set_name: str, options: dict[str, Any] | None) -> str:
    """The method an attack set of ``params.yaml`` runs: its ``attack`` option, else the set's own name."""
    return (options or {}).get("attack") or set_name
