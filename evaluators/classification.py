"""Top-1/top-5 of one model on one shard set, streamed from the shards, with per-sample predictions; and ReaL top-1
where the samples carry label sets (``label_set`` in the JSON: the classes acceptable for the image, the
ImageNet-ReaL convention of Beyer et al. 2020 and timm's ``--real-labels``): the top prediction counts as right when
it is in the set, and an image with an empty or no set is left out of it.

Clean and adversarial sets go through the same path: uint8 PNG -> [0,1] float -> (resize to the model's input
size when it differs, bicubic, the same for every set) -> the model wrapper's normalisation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from shards.shardset import FIELDS, MAX_MEMBER_BYTES, check_members
from shards.verify import read_sums


def shardset_hash(root: Path | str) -> str:
    """Identity of a shard set's images and labels: the hash of its shards' lines in SHA256SUMS (the card and
    index files do not change what a model sees)."""
    sums = Path(root) / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"{sums}: missing; not a finished shard set")
    shard_lines = [line for line in sums.read_text().splitlines() if line.endswith(".tar")]
    return hashlib.sha256("\n".join(shard_lines).encode()).hexdigest()[:16]


def _format_fields_only(sample: dict[str, Any]) -> dict[str, Any]:
    """Refuse a sample with members the shard format does not define (a ``.pyd`` would be unpickled: code runs)."""
    extra = sorted(k for k in sample if not k.startswith("__") and k not in FIELDS)
    if extra:
        raise ValueError(f"{sample.get('__url__')}: sample {sample['__key__']!r} has members {extra} beyond "
                         f"{sorted(FIELDS)}; refusing to read it")
    return sample


def _decode(sample):
    image, cls, meta, key = sample
    return torch.from_numpy(np.array(image)).permute(2, 0, 1), int(cls), key, meta.get("label_set")


def shard_loader(root: Path | str, batch_size: int, workers: int = 0, max_member: int = MAX_MEMBER_BYTES):
    """Batches ``(uint8 NCHW, labels, keys, label sets)`` in shard order (a set is None where the sample has none);
    at most one loader worker per shard. Only the shards ``SHA256SUMS`` lists are read: a stray ``.tar`` beside
    them is not part of the set (it made n = 350 of a 300-image set, under the cache key of the 300)."""
    problems: list[str] = []
    listed = read_sums(Path(root) / "SHA256SUMS", problems)
    if problems:
        raise ValueError(problems[0])
    urls = [str(Path(root) / name) for name in sorted(listed) if name.endswith(".tar")]
    for url in urls:  # webdataset reads each member whole: a 6 GiB one was a MemoryError
        check_members(url, max_member)
    if not urls:
        raise FileNotFoundError(f"{root}: no shards")
    # webdataset splits by shard: a worker without a shard ends the loader with "No samples found"
    workers = min(workers, len(urls))
    ds = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
        .map(_format_fields_only)
        .decode("rgb8", only=["png", "cls", "json"])
        .to_tuple("png", "cls", "json", "__key__")
        .map(_decode)
        .batched(batch_size, partial=True)
    )
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())


def logits_at_model_size(model, x: torch.Tensor) -> torch.Tensor:
    size = model.data_config["input_size"][-1]
    if x.shape[-1] != size:  # documented: one bicubic resize, the same for clean and adversarial images
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return model(x)


@torch.no_grad()
def evaluate_shardset(model, root: Path | str, batch_size: int = 256, device: str = "cpu",
                      workers: int = 0) -> dict[str, Any]:
    """Accuracy of ``model`` on the shard set; halves the batch and retries on CUDA out-of-memory."""
    while True:
        try:
            return _evaluate(model, root, batch_size, device, workers)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()


def _evaluate(model, root, batch_size, device, workers) -> dict[str, Any]:
    model.eval().to(device)
    dtype = next(model.parameters()).dtype
    keys, labels, top5, label_sets = [], [], [], []
    for x, y, k, sets in shard_loader(root, batch_size, workers):
        logits = logits_at_model_size(model, x.to(device, non_blocking=True).to(dtype).div_(255))
        top5.append(logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu())
        labels.append(y)
        keys += list(k)
        label_sets += list(sets)
    order = sorted(range(len(keys)), key=keys.__getitem__)  # worker interleaving must not change the output
    keys, label_sets = [keys[i] for i in order], [label_sets[i] for i in order]
    top5_t, labels_t = torch.cat(top5)[order], torch.cat(labels)[order]
    hit1 = top5_t[:, 0] == labels_t
    hit5 = (top5_t == labels_t[:, None]).any(1)
    real_hits = [int(t[0]) in s for t, s in zip(top5_t, label_sets) if s]
    predictions = [{"key": key, "label": int(lab), "top5": t.tolist(), **({"label_set": s} if s is not None else {})}
                   for key, lab, t, s in zip(keys, labels_t, top5_t, label_sets)]
    return {
        "n": len(keys),
        "top1": round(100 * hit1.float().mean().item(), 3),
        "top5": round(100 * hit5.float().mean().item(), 3),
        "real_n": len(real_hits),  # images with a non-empty label set
        "real_top1": round(100 * sum(real_hits) / len(real_hits), 3) if real_hits else None,
        "predictions": predictions,
    }
