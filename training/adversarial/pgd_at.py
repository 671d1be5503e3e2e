"""PGD adversarial training (Madry et al., 2018): the multi-step reference the single-step methods are compared
to; ``steps`` iterations of ``alpha`` (default eps/4) from a random start, projected onto the eps ball."""

from __future__ import annotations

from training.adversarial.base import AdvTrainMethod, linf_pgd


class PGDAT(AdvTrainMethod):
    name = "pgd-at"

    def __init__(self, eps, alpha=None, seed=0, steps: int = 7):
        super().__init__(eps, alpha, seed)
        self.steps = steps

    def default_alpha(self, eps):
        return eps / 4

    def perturb(self, model, x, y):
        return linf_pgd(model, x, y, self.eps, self.step, self.steps, random_start=True, gen=self.gen)
