"""Attacks on [0,1] NCHW batches, one module per method, created by name from the registry.

Importing the package loads no torch: the classes and helpers below come from :mod:`attacks.base` on first use.
"""

import functools
import hashlib
import importlib
from pathlib import Path

from attacks.registry import create_attack, list_attacks

__all__ = ["Attack", "AttackConfig", "code_digest", "create_attack", "list_attacks", "quantize", "rmsd"]
_FROM_BASE = ("Attack", "AttackConfig", "quantize", "rmsd")


def __getattr__(name: str):
    if name in _FROM_BASE:
        return getattr(importlib.import_module("attacks.base"), name)
    raise AttributeError(f"module 'attacks' has no attribute {name!r}")


@functools.cache
def code_digest() -> str:
    """Short sha256 of this package's source: a shard made by other attack code was made by another job."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
