"""NatMU (natural machine unlearning): teach the model *natural* wrong answers for the forget set.

For each forgetting image, take the original model's top-``k`` wrong classes (k = 4); for each such class, blend
the forgetting image with a random remaining image of that class through a smooth ramp mask (the forgetting image
holds a ``share`` of 30-50% of the hybrid) and label the hybrid with that class. Fine-tune with plain cross-entropy
on the remaining data plus the hybrids.
"""

from __future__ import annotations

import math

import torch

from model_zoo.training import predict
from training.unlearning.base import UnlearningMethod


def ramp_mask(size: int, share: float, gen: torch.Generator, width: float = 0.5) -> torch.Tensor:
    """A soft edge along a random direction: 1 on one side, 0 on the other, a linear ramp ``width`` (in image
    sides) wide between; its offset is found by bisection so the mask's mean is ``share``."""
    theta = torch.rand((), generator=gen).item() * 2 * math.pi
    ys, xs = torch.meshgrid(torch.linspace(-0.5, 0.5, size), torch.linspace(-0.5, 0.5, size), indexing="ij")
    t = xs * math.cos(theta) + ys * math.sin(theta)

    def mask(offset):
        return ((offset - t) / width + 0.5).clamp(0, 1)

    lo, hi = -2.0, 2.0  # mean(mask) rises with the offset from 0 to 1
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mask(mid).mean() < share else (lo, mid)
    return mask((lo + hi) / 2)


def build_hybrids(model, data, top_k: int = 4, share_range=(0.3, 0.5), seed: int = 0):
    """``(hybrids uint8, labels, records)``; each record names the forgetting index, partner index in the
    remaining set, class and mask share (for inspection and tests)."""
    (xf, yf), (xr, yr) = data.forget, data.remain
    gen = torch.Generator().manual_seed(seed)
    logits = predict(model, xf)
    logits[torch.arange(len(yf)), yf] = -float("inf")  # wrong classes only
    by_class = {c: torch.nonzero(yr == c).flatten() for c in range(data.num_classes)}
    hybrids, labels, records = [], [], []
    for i, wrong in enumerate(logits.topk(top_k, dim=1).indices.tolist()):
        for c in wrong:
            pool = by_class[c]
            if len(pool) == 0:
                continue  # a class with no remaining image cannot host a hybrid
            j = pool[torch.randint(len(pool), (1,), generator=gen)].item()
            share = share_range[0] + (share_range[1] - share_range[0]) * torch.rand((), generator=gen).item()
            m = ramp_mask(xf.shape[-1], share, gen)
            hybrid = m * xf[i].float() + (1 - m) * xr[j].float()
            hybrids.append(hybrid.round().clamp(0, 255).to(torch.uint8))
            labels.append(c)
            records.append({"forget": i, "partner": j, "label": c, "share": m.mean().item()})
    return torch.stack(hybrids), torch.tensor(labels), records


class NatMU(UnlearningMethod):
    name = "natmu"
    top_k = 4

    def unlearn(self, model, data):
        hybrids, labels, _ = build_hybrids(model, data, self.top_k, seed=self.seed)
        xr, yr = data.remain
        self.fine_tune(model, torch.cat([xr, hybrids]), torch.cat([yr, labels]))
