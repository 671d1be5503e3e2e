"""``params.yaml``, read in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: parameters file not found (run from the repository root or pass --params)")
    with path.open() as f:
        params = yaml.safe_load(f)
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict[str, Any], name: str, path: str | Path = "params.yaml") -> dict[str, Any]:
    if name not in params:
        raise KeyError(f"{path}: missing section '{name}'")
    return params[name]


def write_json(path: str | Path, obj: Any) -> None:
    """Metrics and records as sorted, indented JSON (stable bytes for DVC diffs)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
