"""Two shard sets of the same clean images, image by image: which images' bytes differ, by how much, and whether
the difference changes what the victims predict. For a regenerated set against a published one (``damagenet
compare``): AoA's fp32 steps are not bit-identical across CPU models, so a set made elsewhere can differ by a
quantisation step at some pixels; this says how many images that touches and whether any victim notices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluators.classification import logits_at_model_size
from shards.shardset import iter_shardset
from shards.verify import verify_files


class NotComparable(ValueError):
    """The two folders are not two versions of one set of images (the message names the folder and the problem)."""


def compare_shardsets(a: Path | str, b: Path | str, models: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Pixel differences on the 0-255 scale over every image (``max_abs``, ``mean_abs``, ``rmsd``: the root mean
    square of the difference) and, per victim in ``models``, how many of the differing images it classifies
    differently in the two sets (top-1)."""
    for root in (a, b):
        problems = verify_files(root)
        if problems:
            raise NotComparable(f"{root}: not a complete shard set ({problems[0]})")
    first = {s["key"]: s for s in iter_shardset(a)}
    second = {s["key"]: s for s in iter_shardset(b)}
    if first.keys() != second.keys():
        only = sorted(first.keys() ^ second.keys())
        raise NotComparable(f"{b}: not the images of {a} ({len(only)} key(s) in one set only, e.g. {only[0]!r})")
    differing, max_abs, abs_sum, sq_sum, pixels = [], 0, 0, 0, 0
    for key in sorted(first):
        x, y = first[key]["image"], second[key]["image"]
        if x.shape != y.shape:
            raise NotComparable(f"{b}: image {key!r} is {y.shape}, {x.shape} in {a}")
        delta = np.abs(x.astype(np.int64) - y.astype(np.int64))
        pixels += delta.size
        if delta.any():
            differing.append(key)
            max_abs, abs_sum, sq_sum = max(max_abs, int(delta.max())), abs_sum + int(delta.sum()), sq_sum + int((delta**2).sum())
    changed = {name: _changed_predictions(model, [first[k]["image"] for k in differing],
                                          [second[k]["image"] for k in differing]) for name, model in (models or {}).items()}
    return {"images": len(first), "differing": len(differing), "differing_keys": differing, "max_abs": max_abs,
            "mean_abs": abs_sum / pixels if pixels else 0.0, "rmsd": (sq_sum / pixels) ** 0.5 if pixels else 0.0,
            "changed_predictions": changed}


@torch.no_grad()
def _changed_predictions(model: torch.nn.Module, images_a: list[np.ndarray], images_b: list[np.ndarray],
                         batch_size: int = 64) -> int:
    model.eval()
    changed = 0
    for i in range(0, len(images_a), batch_size):
        pair = [torch.from_numpy(np.stack(imgs[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
                for imgs in (images_a, images_b)]
        changed += int((logits_at_model_size(model, pair[0]).argmax(1) != logits_at_model_size(model, pair[1]).argmax(1)).sum())
    return changed
