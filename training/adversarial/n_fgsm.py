"""N-FGSM (de Jorge et al., 2022): stronger noise U(-2 eps, 2 eps), a step of eps, and *no* projection, so the
perturbation reaches up to 3 eps in L-inf by design; avoids catastrophic overfitting without extra cost."""

from __future__ import annotations

from training.adversarial.base import AdvTrainMethod, input_gradient


class NFGSM(AdvTrainMethod):
    name = "n-fgsm"
    noise_factor = 2.0

    def perturb(self, model, x, y):
        noise = self.start_noise(x, self.noise_factor * self.eps)
        delta = noise + self.step * input_gradient(model, x + noise, y).sign()
        return ((x + delta).clamp(0, 1) - x).detach()
