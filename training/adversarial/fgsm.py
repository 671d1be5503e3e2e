"""FGSM adversarial training: one signed-gradient step of ``eps`` from the clean image (Goodfellow et al.), the
setting most prone to catastrophic overfitting; ``fgsm-rs`` starts from U(-eps, eps) and steps 1.25 eps, then
projects back to the eps ball (Wong et al., "Fast is better than free")."""

from __future__ import annotations

from training.adversarial.base import AdvTrainMethod, input_gradient


class FGSM(AdvTrainMethod):
    name = "fgsm"
    random_start = False

    def default_alpha(self, eps):
        return 1.25 * eps if self.random_start else eps

    def perturb(self, model, x, y):
        start = self.start_noise(x, self.eps) if self.random_start else x.new_zeros(x.shape)
        delta = start + self.step * input_gradient(model, x + start, y).sign()
        delta = delta.clamp(-self.eps, self.eps)
        return ((x + delta).clamp(0, 1) - x).detach()


class FGSMRandomStart(FGSM):
    name = "fgsm-rs"
    random_start = True
