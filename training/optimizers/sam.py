"""SAM: Sharpness-Aware Minimisation (Foret et al., 2021) around any base optimiser.

Step: ascend to ``w + rho * d / ||d||`` with ``d`` the minibatch gradient, take the gradient there, come back to
``w`` and let the base optimiser step with that gradient. Two-step use (``first_step``, second forward/backward,
``second_step``) or closure use (``step(closure)``, the closure zeroes, computes the loss and calls backward).
BatchNorm running statistics are restored after the second pass (it is a probe of the loss surface, not data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


@contextmanager
def frozen_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """Run a forward pass in train mode and put every BatchNorm running statistic back afterwards."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if model else []
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(bns, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base: torch.optim.Optimizer | type[torch.optim.Optimizer], rho: float = 0.05,
                 model: nn.Module | None = None, **base_kwargs):
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho))
        # the base optimiser shares our param groups, so a scheduler attached to it (or to us) sets both
        self.base_optimizer = base(self.param_groups, **base_kwargs) if isinstance(base, type) else base
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group.setdefault("rho", rho)
        self.model = model

    def _ascent_direction(self, p: torch.Tensor) -> torch.Tensor:
        return p.grad

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to ``w + e(w)``."""
        directions = {p: self._ascent_direction(p) for g in self.param_groups for p in g["params"] if p.grad is not None}
        norm = torch.norm(torch.stack([d.norm(2) for d in directions.values()])) if directions else 0.0
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p in directions:
                    self.state[p]["w"] = p.detach().clone()
                    p.add_(directions[p] * scale)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` (bit-exact copy) and step the base optimiser with the gradient taken at ``w + e(w)``."""
        for group in self.param_groups:
            for p in group["params"]:
                if "w" in self.state[p]:
                    p.copy_(self.state[p].pop("w"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Our state (F-SAM's EMA) and the base optimiser's (momentum, Adam moments), for checkpoints/rollback."""
        return {"wrapper": super().state_dict(), "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict["wrapper"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # shared again after both were rebuilt

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure (or use first_step/second_step)")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        with frozen_bn_stats(self.model):
            closure()
        self.second_step()
        return loss
