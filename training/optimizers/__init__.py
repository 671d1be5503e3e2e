"""Optimisers by name: ``build_optimizer("sam", params, lr=..., base="sgd", rho=0.05)``."""

from training.optimizers.registry import build_optimizer, list_optimizers, schedulable

__all__ = ["build_optimizer", "list_optimizers", "schedulable"]
