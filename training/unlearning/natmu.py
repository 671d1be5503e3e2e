"""NatMU (natural machine unlearning): teach the model *natural* wrong answers for the forget set.

For each forgetting image, take the original model's top-4 wrong classes; for the k-th of them, blend the
forgetting image with a random remaining image of that class through the k-th of four fixed ramp patterns and
label the hybrid with that class. Fine-tune with plain cross-entropy on the remaining data plus the hybrids.

The patterns are the official code's (``generate_mask_cifar``): a tent along the rows, a tent along the columns and
the two inverted (V) versions, each rising linearly from 0 to (b-1)/b over half the side b, shifted by ``delta``
and clipped to [0, 1]; the pattern weighs the forgetting image, one minus it the remaining one. The authors'
CIFAR-10 script uses delta = -0.19, which leaves the forgetting image about 30% of the hybrid.
"""

from __future__ import annotations

import torch

from training.supervised import predict
from training.unlearning.base import UnlearningMethod


def pattern_masks(size: int, delta: float = -0.19) -> torch.Tensor:
    """The four hybrid patterns as a (4, size, size) tensor: forgetting-image weight per pixel."""
    half = size // 2
    position = torch.arange(size)
    ramp = (position % half).float() / half  # 0 .. (half-1)/half in each half
    tent = torch.where(position < half, ramp, (half - 1) / half - ramp)  # rises over the first half, falls over the second
    vee = (half - 1) / half - tent
    rows = [tent[:, None].expand(size, size), tent[None, :].expand(size, size),
            vee[:, None].expand(size, size), vee[None, :].expand(size, size)]
    return (torch.stack(rows) + delta).clamp(0, 1)


def build_hybrids(model, data, delta: float = -0.19, seed: int = 0):
    """``(hybrids uint8, labels, records)``; each record names the forgetting index, partner index in the
    remaining set, class, pattern and the forgetting image's share (for inspection and tests)."""
    (xf, yf), (xr, yr) = data.forget, data.remain
    gen = torch.Generator().manual_seed(seed)
    masks = pattern_masks(xf.shape[-1], delta)
    logits = predict(model, xf)
    logits[torch.arange(len(yf)), yf] = -float("inf")  # wrong classes only
    by_class = {c: torch.nonzero(yr == c).flatten() for c in range(data.num_classes)}
    hybrids, labels, records = [], [], []
    for i, wrong in enumerate(logits.topk(len(masks), dim=1).indices.tolist()):
        for k, c in enumerate(wrong):
            pool = by_class[c]
            if len(pool) == 0:
                continue  # a class with no remaining image cannot host a hybrid
            j = pool[torch.randint(len(pool), (1,), generator=gen)].item()
            hybrid = masks[k] * xf[i].float() + (1 - masks[k]) * xr[j].float()
            hybrids.append(hybrid.round().clamp(0, 255).to(torch.uint8))
            labels.append(c)
            records.append({"forget": i, "partner": j, "label": c, "pattern": k, "share": masks[k].mean().item()})
    return torch.stack(hybrids), torch.tensor(labels), records


class NatMU(UnlearningMethod):
    name = "natmu"
    delta = -0.19

    def unlearn(self, model, data):
        hybrids, labels, _ = build_hybrids(model, data, self.delta, seed=self.seed)
        xr, yr = data.remain
        self.fine_tune(model, torch.cat([xr, hybrids]), torch.cat([yr, labels]))
