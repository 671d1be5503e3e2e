"""Image tensors for the training stages from published shard sets (DAmageNet images to mix in or test on)."""

from __future__ import annotations

import numpy as np
import torch

from shards.shardset import iter_shardset


def shard_images(roots: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of the given shard sets, as uint8 NCHW."""
    samples = [s for root in roots for s in iter_shardset(root)]
    if not samples:
        raise ValueError(f"no samples in the shard sets {roots}")
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([s["cls"] for s in samples])
