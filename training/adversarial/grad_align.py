"""GradAlign (Andriushchenko & Flammarion, 2020): FGSM training plus
``lam * (1 - cos(grad_x l(x), grad_x l(x + eta)))`` with ``eta ~ U(-eps, eps)``, keeping the loss locally
linear so a single step stays a good attack. As in the official code, the clean-input gradient is a constant of
the regulariser (detached) and only the gradient at the noisy point is double-backpropagated."""

from __future__ import annotations

import torch.nn.functional as F

from training.adversarial.base import input_gradient
from training.adversarial.fgsm import FGSM


class GradAlign(FGSM):
    name = "gradalign"

    def __init__(self, eps, alpha=None, seed=0, lam: float | None = None, **noise):
        super().__init__(eps, alpha, seed, **noise)  # clamp_start, grey_noise
        # the paper's values: 0.2 at 8/255, 2.0 at 16/255; between and beyond, interpolate on a log scale
        self.lam = lam if lam is not None else 0.2 * 10 ** ((eps * 255 - 8) / 8)

    def alignment(self, model, x, y, g_clean=None):
        """``1 - cos`` of the input gradients at ``x`` (detached) and at a random point of the eps ball, per sample."""
        if g_clean is None:
            g_clean = input_gradient(model, x, y)
        noisy = (x + self.start_noise(x, self.eps)).detach().requires_grad_(True)
        g_noisy = input_gradient(model, noisy, y, create_graph=True)
        return 1 - F.cosine_similarity(g_clean.detach().flatten(1), g_noisy.flatten(1), dim=1, eps=1e-12)

    def loss(self, model, x, y):
        # the FGSM step and the regulariser share the clean-input gradient (FGSM only needs its sign)
        g_clean = input_gradient(model, x, y)
        delta = ((x + self.step * g_clean.sign()).clamp(0, 1) - x).detach()
        ce = F.cross_entropy(model(x + delta), y)
        return ce + self.lam * self.alignment(model, x, y, g_clean).mean()

    def __repr__(self):
        return super().__repr__()[:-1] + f", lam={self.lam:.3g})"
