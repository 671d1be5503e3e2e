"""Attacks by name: ``create_attack("aoa", model, eta=7/255)``; ``list_attacks()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ATTACKS: dict[str, Callable[..., Any]] = {}


def register_attack(name: str, **preset):
    """Register a class (or a preset of it: fixed config overrides) under ``name``."""

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
    return sorted(_ATTACKS)


def create_attack(name: str, model, config=None, **overrides):
    if name not in _ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known attacks: {', '.join(list_attacks())}")
    return _ATTACKS[name](model, config, **overrides)


def attack_method(set_name: str, options: dict[str, Any] | None) -> str:
    """The method an attack set of ``params.yaml`` runs: its ``attack`` option, else the set's own name."""
    return (options or {}).get("attack") or set_name
