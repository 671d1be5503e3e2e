"""RL: relabel the forget set with random wrong labels and fine-tune on it together with the remaining data."""

from __future__ import annotations

import torch

from training.unlearning.base import UnlearningMethod, random_other_labels


class RandomLabels(UnlearningMethod):
    name = "rl"

    def relabelled(self, data):
        gen = torch.Generator().manual_seed(self.seed)
        (xf, yf), (xr, yr) = data.forget, data.remain
        return torch.cat([xf, xr]), torch.cat([random_other_labels(yf, data.num_classes, gen), yr])

    def unlearn(self, model, data):
        self.fine_tune(model, *self.relabelled(data))
