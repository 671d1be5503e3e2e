"""GradAlign (Andriushchenko & Flammarion, 2020): FGSM training plus
``lam * (1 - cos(grad_x l(x), grad_x l(x + eta)))`` with ``eta ~ U(-eps, eps)``, keeping the loss locally
linear so a single step stays a good attack. Double backpropagation: the regulariser's graph is kept."""

from __future__ import annotations

import torch.nn.functional as F

from training.adversarial.base import input_gradient
from training.adversarial.fgsm import FGSM


class GradAlign(FGSM):
    name = "gradalign"

    def __init__(self, eps, alpha=None, seed=0, lam: float | None = None):
        super().__init__(eps, alpha, seed)
        # the paper's values: 0.2 at 8/255, 2.0 at 16/255; between and beyond, interpolate on a log scale
        self.lam = lam if lam is not None else 0.2 * 10 ** ((eps * 255 - 8) / 8)

    def alignment(self, model, x, y, g_clean=None):
        """``1 - cos`` of the input gradients at ``x`` and at a random point of the eps ball, per sample."""
        if g_clean is None:
            g_clean = input_gradient(model, x.detach().requires_grad_(True), y, create_graph=True)
        eta = self.uniform(x, self.eps)
        g_noisy = input_gradient(model, (x + eta).clamp(0, 1).detach().requires_grad_(True), y, create_graph=True)
        return 1 - F.cosine_similarity(g_clean.flatten(1), g_noisy.flatten(1), dim=1, eps=1e-12)

    def loss(self, model, x, y):
        # the FGSM step and the regulariser share the clean-input gradient (FGSM only needs its sign)
        g_clean = input_gradient(model, x.detach().requires_grad_(True), y, create_graph=True)
        delta = ((x + self.step * g_clean.detach().sign()).clamp(0, 1) - x).detach()
        ce = F.cross_entropy(model(x + delta), y)
        return ce + self.lam * self.alignment(model, x, y, g_clean).mean()

    def __repr__(self):
        return super().__repr__()[:-1] + f", lam={self.lam:.3g})"
