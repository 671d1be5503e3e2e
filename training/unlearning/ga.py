"""GA: gradient ascent on the forget set (maximise its cross-entropy) for a few steps; nothing anchors the
remaining data, so it trades utility for forgetting quickly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.optimizers import build_optimizer
from training.unlearning.base import UnlearningMethod


class GradientAscent(UnlearningMethod):
    name = "ga"
    defaults = {"epochs": 1, "lr": 1e-4, "batch_size": 64, "optimizer": "sgd"}

    def unlearn(self, model, data):
        x, y = data.forget
        r = self.recipe
        opt = build_optimizer(r["optimizer"], model.parameters(), lr=r["lr"], **r.get("optimizer_kwargs", {}))
        gen = torch.Generator().manual_seed(self.seed)
        model.train()
        for _ in range(r["epochs"]):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), r["batch_size"]):
                idx = order[i : i + r["batch_size"]]

                def closure(idx=idx):
                    opt.zero_grad(set_to_none=True)
                    loss = -F.cross_entropy(model(x[idx].float().div(255)), y[idx])
                    loss.backward()
                    return loss

                opt.step(closure)
        model.eval()
