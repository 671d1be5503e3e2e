"""Admix (Wang, He, Lin & Hopcroft, "Admix: Enhancing the transferability of adversarial attacks", ICCV 2021).

SI's scale copies of *admixed* images: each image gets a small share ``eta`` of another image added, and the
gradient is the mean over ``m2`` partners and ``m1`` scales of

    grad_x J(gamma_i * (x + eta * x'), y),   gamma_i = 1 / 2^i,  i < m1,

keeping the image's own label: the gradient with respect to x, so each copy's gradient counts gamma_i times (the
chain rule; the partners are held constant). SI-FGSM here averages its copies' own gradients instead (module
:mod:`attacks.base`). With momentum (mu = 1), as the authors run it. Their settings (and TransferAttack's):
m1 = 5 (``si``), m2 = 3, eta = 0.2. The partners x' are the other images of the batch in a random order (as the
authors' and TransferAttack's code draw them), so an image alone in its batch is mixed with itself.
"""

from __future__ import annotations

import torch

from attacks.fgsm_family import CrossEntropyAttack
from attacks.registry import register_attack


@register_attack("admix", mi=1.0, si=5)
class Admix(CrossEntropyAttack):
    partners = 3  # m2
    strength = 0.2  # eta

    @property
    def copies_per_image(self) -> int:
        return self.config.si * self.partners

    def input_copies(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = torch.cat([x + self.strength * x[torch.randperm(len(x), generator=gen).to(x.device)]
                           for _ in range(self.partners)])
        copies = torch.cat([mixed / 2**i for i in range(self.config.si)])  # scale-major: i, then partner
        # the gradient with respect to x: the chain rule's gamma_i, as a weight per copy (the partners are constants)
        gamma = torch.tensor([2.0**-i for i in range(self.config.si)], dtype=torch.float64)
        return copies, gamma.repeat_interleave(self.partners) / self.copies_per_image
