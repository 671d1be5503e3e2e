"""RL: relabel the forget set with random labels and fine-tune on it together with the remaining data.

``any_class`` draws each label from every class, the true one included, as SalUn's code does
(``np.random.randint(0, num_classes)``); otherwise from the other classes only."""

from __future__ import annotations

import torch

from training.unlearning.base import UnlearningMethod, random_other_labels


class RandomLabels(UnlearningMethod):
    name = "rl"
    any_class = False

    def relabelled(self, data):
        gen = torch.Generator().manual_seed(self.seed)
        (xf, yf), (xr, yr) = data.forget, data.remain
        new = (torch.randint(0, data.num_classes, yf.shape, generator=gen) if self.any_class
               else random_other_labels(yf, data.num_classes, gen))
        return torch.cat([xf, xr]), torch.cat([new, yr])

    def unlearn(self, model, data):
        self.fine_tune(model, *self.relabelled(data))
