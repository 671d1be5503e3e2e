"""Two shard sets of the same clean images, image by image: which images' bytes differ, by how much, and whether
the difference changes what the victims predict. For a regenerated set against a published one (``damagenet
compare``): AoA's fp32 steps are not bit-identical across CPU models, so a set made elsewhere can differ by a
quantisation step at some pixels; this says how many images that touches and whether any victim notices."""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluators.classification import logits_at_model_size
from shards.shardset import iter_shardset
from shards.verify import verify_files


class NotComparable(ValueError):
    """The two folders are not two versions of one set of images (the message names the folder and the problem)."""


def compare_shardsets(a: Path | str, b: Path | str, models: dict[str, torch.nn.Module] | None = None,
                      batch_size: int = 64) -> dict[str, Any]:
    """Pixel differences on the 0-255 scale over every image (``max_abs``, ``mean_abs``, ``rmsd``: the root mean
    square of the difference) and, per victim in ``models``, how many of the differing images it classifies
    differently in the two sets (top-1). The sets are read side by side, one sample of each at a time (an ImageNet
    set does not fit in memory twice); both list their samples in the clean set's order."""
    for root in (a, b):
        problems = verify_files(root)
        if problems:
            raise NotComparable(f"{root}: not a complete shard set ({problems[0]})")
    models = models or {}
    differing, changed, pending = [], dict.fromkeys(models, 0), []
    images, max_abs, abs_sum, sq_sum, pixels = 0, 0, 0, 0, 0
    for first, second in zip_longest(iter_shardset(a), iter_shardset(b)):
        if first is None or second is None or first["key"] != second["key"]:
            here = "(none)" if second is None else repr(second["key"])
            raise NotComparable(f"{b}: not the images of {a} (sample {images}: key {here} where {a} has "
                                f"{'(none)' if first is None else repr(first['key'])})")
        x, y = first["image"], second["image"]
        if x.shape != y.shape:
            raise NotComparable(f"{b}: image {first['key']!r} is {y.shape}, {x.shape} in {a}")
        delta = np.abs(x.astype(np.int64) - y.astype(np.int64))
        images, pixels = images + 1, pixels + delta.size
        if delta.any():
            differing.append(first["key"])
            max_abs, abs_sum, sq_sum = max(max_abs, int(delta.max())), abs_sum + int(delta.sum()), sq_sum + int((delta**2).sum())
            if models:
                pending.append((x, y))
        if len(pending) == batch_size:
            _count_changed(models, pending, changed)
    _count_changed(models, pending, changed)
    return {"images": images, "differing": len(differing), "differing_keys": differing, "max_abs": max_abs,
            "mean_abs": abs_sum / pixels if pixels else 0.0, "rmsd": (sq_sum / pixels) ** 0.5 if pixels else 0.0,
            "changed_predictions": changed}


@torch.no_grad()
def _count_changed(models: dict[str, torch.nn.Module], pairs: list[tuple[np.ndarray, np.ndarray]],
                   changed: dict[str, int]) -> None:
    """Add each model's top-1 changes over ``pairs`` (clean-set order) to ``changed``; empties ``pairs``."""
    if not pairs:
        return
    batch = [torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255 for imgs in zip(*pairs)]
    for name, model in models.items():
        model.eval()
        changed[name] += int((logits_at_model_size(model, batch[0]).argmax(1)
                              != logits_at_model_size(model, batch[1]).argmax(1)).sum())
    pairs.clear()
