"""One generation work unit: attack every image of a clean shard and write the adversarial shard.

Pure computation (no orchestration): the generate flow maps it over devices; benchmarks call it directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import AttackConfig, create_attack
from model_zoo.zoo import build_model
from shards.shardset import ShardWriter, read_shard, shard_records, tar_samples


def shard_seed(seed: int, name: str) -> int:
    """A shard's seed depends on the run seed and the shard's name only, never on scheduling."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def job_digest(unit: dict[str, Any]) -> str:
    """Everything that decides a shard's bytes except its paths: the clean shard's checksum, attack, config,
    surrogate, batching, seed."""
    job = {k: v for k, v in unit.items() if k not in ("in_shard", "out_shard")}
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _surrogate(spec_json: str, device: str):
    return build_model(json.loads(spec_json), device=device)


def attack_shard_file(unit: dict[str, Any], device: str, threads: int = 1,
                      on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Attack ``unit["in_shard"]`` on ``device`` into ``unit["out_shard"]``; a complete output is left alone.

    ``unit`` holds paths and small configs only: attack name, ``config`` (AttackConfig fields), ``attack_kwargs``,
    ``budget`` (0-255 scale, for provenance), ``surrogate`` (zoo spec), ``batch_size`` and ``seed``. ``threads``:
    intra-op CPU threads (the caller gives every concurrent worker the same number); ``on_batch(done, total)``:
    called after each batch with the shard's image counts.
    """
    out = Path(unit["out_shard"])
    digest = job_digest(unit)
    repaired = None
    if out.exists():
        state = _existing_output(out, digest, count=sum(1 for _ in tar_samples(unit["in_shard"])))
        if state == "complete":
            return {"shard": out.name, "skipped": True, "device": device}
        if state.startswith("job "):  # never skip (or silently replace) a shard made by another job
            raise FileExistsError(f"{out}: made with other parameters or from another clean shard ({state}, now "
                                  f"{digest}); move the old set away or use another output folder")
        repaired = state
        out.unlink()  # damaged: regenerate it
    if device == "cpu":
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = _surrogate(json.dumps(unit["surrogate"], sort_keys=True), device)
    attack = create_attack(unit["attack"], model, AttackConfig(**unit["config"]), **unit.get("attack_kwargs", {}))
    clean = list(read_shard(unit["in_shard"]))
    seed, count, steps = shard_seed(unit["seed"], out.name), 0, 0
    with ShardWriter(out) as sink:  # samples stream into <shard>.tmp; renamed only when the shard is complete
        for b in range(0, len(clean), unit["batch_size"]):
            batch = clean[b : b + unit["batch_size"]]
            x = torch.from_numpy(np.stack([s["image"] for s in batch])).to(device).permute(0, 3, 1, 2).float() / 255
            y = torch.tensor([s["cls"] for s in batch], device=device)
            adv, records = attack(x, y, seed=seed + b)
            adv_u8 = (adv * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            for s, img, rec in zip(batch, adv_u8, records):
                provenance = {**s["json"], **rec, "surrogate": unit["surrogate"]["name"], "seed": seed + b,
                              "job_digest": digest,
                              **{k: unit["budget"][k] for k in ("eta", "eps", "alpha")}}
                sink.write({"key": s["key"], "image": img, "cls": s["cls"], "json": provenance})
                count, steps = count + 1, steps + rec["steps"]
            if on_batch:
                on_batch(count, len(clean))
    return {"shard": out.name, "skipped": False, "device": device, "count": count, "steps": steps,
            "seconds": time.perf_counter() - start, "repaired": repaired}


def _existing_output(out: Path, digest: str, count: int) -> str:
    """``"complete"``; ``"job <digest>"`` when another job made it; otherwise what is damaged about it."""
    try:
        records = [meta for _, _, meta in shard_records(out)]
    except (tarfile.TarError, OSError, ValueError, KeyError) as e:  # truncated, zero bytes, garbled members
        return f"unreadable: {e}"
    if not records:
        return "no samples"
    made_with = {r.get("job_digest") for r in records}
    if made_with != {digest}:
        return f"job {', '.join(sorted(map(str, made_with)))}"
    if len(records) != count:
        return f"{len(records)} samples, its clean shard has {count}"
    return "complete"
