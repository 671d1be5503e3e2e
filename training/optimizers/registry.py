"""The one place an optimiser is built from its name (``params.yaml``: ``optimizer: sam``, ``optimizer_kwargs``).

Every training stage (zoo, adversarial training, OOD fine-tuning, unlearning, the optimiser comparison) calls
``build_optimizer``; attach learning-rate schedulers to ``schedulable(opt)``.
"""

from __future__ import annotations

from typing import Any

import torch

from training.optimizers.fsam import FSAM
from training.optimizers.sam import SAM

_BASES: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
_SHARPNESS_AWARE = {"sam": SAM, "fsam": FSAM}


def list_optimizers() -> list[str]:
    return sorted([*_BASES, *_SHARPNESS_AWARE])


def _base_kwargs(name: str, lr: float, weight_decay: float, kwargs: dict[str, Any]) -> dict[str, Any]:
    if name == "sgd":
        return {"lr": lr, "weight_decay": weight_decay, "momentum": kwargs.pop("momentum", 0.9),
                "nesterov": kwargs.pop("nesterov", False)}
    return {"lr": lr, "weight_decay": weight_decay, "betas": tuple(kwargs.pop("betas", (0.9, 0.999)))}


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, model: torch.nn.Module | None = None,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """``sgd`` | ``adamw`` | ``sam`` | ``fsam``; SAM/F-SAM wrap ``base`` (default ``sgd``) and take ``rho``
    (F-SAM also ``sigma``, ``lam``); ``model`` lets them keep BatchNorm statistics out of the second pass."""
    kwargs = dict(kwargs)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"optimizer {name!r}: no trainable parameters")
    if name in _BASES:
        opt = _BASES[name](params, **_base_kwargs(name, lr, weight_decay, kwargs))
    elif name in _SHARPNESS_AWARE:
        base = kwargs.pop("base", "sgd")
        if base not in _BASES:
            raise ValueError(f"optimizer {name!r}: unknown base {base!r} (choose from {', '.join(_BASES)})")
        wrapper_kwargs = {k: kwargs.pop(k) for k in ("rho", "sigma", "lam") if k in kwargs}
        base_kwargs = _base_kwargs(base, lr, weight_decay, kwargs)
        opt = _SHARPNESS_AWARE[name](params, _BASES[base], model=model, **wrapper_kwargs, **base_kwargs)
    else:
        raise ValueError(f"unknown optimizer {name!r} (choose from {', '.join(list_optimizers())})")
    if kwargs:
        raise ValueError(f"optimizer {name!r}: unknown options {sorted(kwargs)}")
    return opt


def schedulable(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser a learning-rate scheduler should be attached to (the base one of SAM/F-SAM)."""
    return getattr(opt, "base_optimizer", opt)
