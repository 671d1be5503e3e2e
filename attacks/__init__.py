"""Attacks on [0,1] NCHW batches, one module per method, created by name from the registry."""

from attacks import aoa, fgsm_family  # noqa: F401  (register the attacks)
from attacks.base import Attack, AttackConfig, quantize, rmsd
from attacks.registry import create_attack, list_attacks

__all__ = ["Attack", "AttackConfig", "create_attack", "list_attacks", "quantize", "rmsd"]
