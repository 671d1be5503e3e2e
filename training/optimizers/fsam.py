"""F-SAM: Friendly SAM (Li et al., CVPR 2024).

SAM's ascent direction mixes the full-batch gradient (which F-SAM argues barely helps) with batch-specific noise.
F-SAM removes an estimate of the full gradient, an EMA ``m`` of past minibatch gradients, before normalising:
``d = g - sigma * m`` and ``e = rho * d / ||d||``. As in the authors' code the *previous* EMA is subtracted, then
the EMA is updated: ``m <- lam * m + (1 - lam) * g``, starting from ``m = g`` at the first step (which is SAM's).
``sigma = 0`` is SAM.
"""

from __future__ import annotations

import torch

from training.optimizers.sam import SAM


class FSAM(SAM):
    def __init__(self, params, base, rho: float = 0.05, sigma: float = 1.0, lam: float = 0.9, model=None,
                 **base_kwargs):
        if not 0 <= lam < 1:
            raise ValueError(f"F-SAM: lam must be in [0, 1), got {lam}")
        super().__init__(params, base, rho=rho, model=model, **base_kwargs)
        self.sigma, self.lam = sigma, lam

    def _ascent_direction(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        ema = state.get("grad_ema")
        direction = p.grad if ema is None else p.grad - self.sigma * ema
        # the official code starts the EMA at the first gradient (not at (1 - lam) g, a bias toward zero)
        state["grad_ema"] = p.grad.clone() if ema is None else ema.mul(self.lam).add(p.grad, alpha=1 - self.lam)
        return direction
