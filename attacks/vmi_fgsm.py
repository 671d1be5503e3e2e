"""VMI-FGSM (Wang & He, "Enhancing the transferability of adversarial attacks through variance tuning", CVPR 2021).

MI-FGSM whose momentum accumulates the gradient plus the previous step's *gradient variance*
``v_t = mean_i grad J(x_{t-1} + r_i) - grad J(x_{t-1})``, ``r_i ~ U[-beta * eps, beta * eps]^d``, ``N`` samples:

    g_t = mu * g_{t-1} + (grad J(x_t) + v_t) / ||grad J(x_t) + v_t||_1,   v_1 = 0.

The authors' settings (and TransferAttack's): N = 20, beta = 1.5, mu = 1. ``eps`` is the run's L-inf bound, so the
neighbourhood scales with the budget, as in the paper. The neighbours are not clipped to [0, 1] (the authors' code
does not either). Each step costs 1 + N gradients.
"""

from __future__ import annotations

import torch

from attacks.fgsm_family import CrossEntropyAttack
from attacks.registry import register_attack


@register_attack("vmi-fgsm", mi=1.0)
class VMIFGSM(CrossEntropyAttack):
    neighbours = 20
    beta = 1.5

    def begin(self, x0: torch.Tensor) -> None:
        self.variance = torch.zeros_like(x0)

    def tuned(self, g, x, labels, idx, gen):
        previous = self.variance[idx]
        self.variance[idx] = self.neighbourhood_gradient(x, labels, gen) - g
        return g + previous

    def neighbourhood_gradient(self, x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The mean gradient over ``neighbours`` uniform samples of the L-inf box of radius ``beta * eps``."""
        radius = self.beta * self.config.eps
        total = torch.zeros_like(x)
        for _ in range(self.neighbours):
            r = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * radius
            total += self.gradient(x + r, labels, gen)
        return total / self.neighbours
