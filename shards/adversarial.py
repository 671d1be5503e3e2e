"""One generation work unit: attack every image of a clean shard and write the adversarial shard.

Pure computation (no orchestration): the generate flow maps it over devices; benchmarks call it directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import AttackConfig, code_digest, create_attack
from attacks.memory import auto_sub_batch, copy_bytes, warn_if_short
from common.files import sha256_file
from model_zoo.zoo import build_model
from shards import STOP, NotOurs, Stopped
from shards.shardset import ShardWriter, read_shard, shard_records, tar_samples


def shard_seed(seed: int, name: str) -> int:
    """A shard's seed depends on the run seed and the shard's name only, never on scheduling."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def job_digest(unit: dict[str, Any]) -> str:
    """Everything that decides a shard's bytes except its paths: the clean shard's checksum, attack, config (the
    resolved copies per pass included), surrogate and its weights' sha256, batching, seed, and the attack code (so a
    changed attack remakes the shards a rerun would otherwise keep as complete)."""
    job = {k: v for k, v in unit.items()
           if k not in ("in_shard", "out_shard", "sub_batch", "workers_per_device", "recorded_sha256")}
    job["attack_code"] = code_digest()
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _surrogate(spec_json: str, device: str):
    return build_model(json.loads(spec_json), device=device)


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "can't allocate memory")))


def attack_shard_file(unit: dict[str, Any], device: str, threads: int = 1,
                      on_batch: Callable[[int, int], None] | None = None,
                      on_step: Callable[[int, int, int, int], None] | None = None) -> dict[str, Any]:
    """Attack ``unit["in_shard"]`` on ``device`` into ``unit["out_shard"]``; a complete output is left alone.

    ``unit`` holds paths and small configs only: attack name, ``config`` (AttackConfig fields but ``sub_batch``),
    ``sub_batch`` (image copies per pass, or ``"auto"``: sized by :mod:`attacks.memory` for ``workers_per_device``
    workers sharing the device), ``attack_kwargs``, ``budget`` (0-255 scale, for provenance), ``surrogate`` (zoo
    spec), ``surrogate_sha256`` (its weights), ``batch_size`` and ``seed``. ``threads``: intra-op CPU threads (the
    caller gives every concurrent worker the same number). ``on_batch(done, total)`` is called after each batch;
    ``on_step(done, total, step, active)`` after each attack step. ``shards.STOP`` stops the job after its current
    step (:class:`shards.Stopped`), leaving no partial file. An existing output is kept only when it is this job's,
    complete, and (``recorded_sha256``, from the set's SHA256SUMS) has the checksum recorded when it was made.
    """
    out = Path(unit["out_shard"])
    if STOP.is_set():
        raise Stopped(f"{out.name}: not started (stop requested)")
    if device == "cpu":
        torch.set_num_threads(threads)
    # keyed on the weights' hash too: a long-lived worker never attacks with weights a file no longer holds
    model = _surrogate(json.dumps({**unit["surrogate"], "sha256": unit.get("surrogate_sha256")}, sort_keys=True),
                       device)
    attack = create_attack(unit["attack"], model, AttackConfig(**unit["config"]), **unit.get("attack_kwargs", {}))
    sub_batch, size = unit.get("sub_batch", 0), model.data_config["input_size"][-1]
    if sub_batch == "auto":
        sub_batch = auto_sub_batch(attack, size, device, unit["workers_per_device"])
        if sub_batch >= unit["batch_size"] * attack.copies_per_image:
            sub_batch = 0  # everything fits in one pass: the same job as sub_batch 0
        warn_if_short(attack, size, device, sub_batch or unit["batch_size"] * attack.copies_per_image,
                      unit["workers_per_device"])
    attack.config = replace(attack.config, sub_batch=sub_batch)
    # the policy auto resolved to: the same job on another device can be another job
    digest = job_digest({**unit, "config": {**unit["config"], "precision": attack.config.precision, "sub_batch": sub_batch}})
    repaired = None
    if out.exists():
        state = _existing_output(out, digest, count=sum(1 for _ in tar_samples(unit["in_shard"])))
        recorded, digest_now = unit.get("recorded_sha256"), sha256_file(out) if state == "complete" else None
        if recorded and digest_now not in (None, recorded):
            state = "its checksum differs from the one SHA256SUMS recorded"
        if state == "complete":
            return {"shard": out.name, "skipped": True, "device": device, "sha256": digest_now}
        if state.startswith("job ") and "None" in state:  # records without a job digest: not written here
            raise NotOurs(f"{out}: not written by this pipeline; move it away or use another output folder")
        # made by another job (other inputs, parameters or weights), or damaged: made anew
        repaired = f"made by another job ({state[4:]})" if state.startswith("job ") else f"damaged ({state})"
        out.unlink()
    clean = list(read_shard(unit["in_shard"]))
    start, seed, count, steps = time.perf_counter(), shard_seed(unit["seed"], out.name), 0, 0

    def step_done(step: int, active: int) -> None:
        if STOP.is_set():
            raise Stopped(f"{out.name}: stopped at step {step}; {count}/{len(clean)} images were done")
        if on_step:
            on_step(count, len(clean), step, active)

    with ShardWriter(out) as sink:  # samples stream into <shard>.tmp; renamed only when the shard is complete
        for b in range(0, len(clean), unit["batch_size"]):
            batch = clean[b : b + unit["batch_size"]]
            x = torch.from_numpy(np.stack([s["image"] for s in batch])).to(device).permute(0, 3, 1, 2).float() / 255
            y = torch.tensor([s["cls"] for s in batch], device=device)
            try:
                adv, records = attack(x, y, seed=seed + b, on_step=step_done)
            except (RuntimeError, MemoryError) as e:
                if not _is_out_of_memory(e):
                    raise
                copies = copy_bytes(attack, size, device) / 2**30
                raise MemoryError(
                    f"{out.name}: out of memory on {device} with {sub_batch or 'all'} image copies per pass (about "
                    f"{copies:.2f} GiB each): set generate.sub_batch in the parameters file to a smaller number "
                    f"(or generate.cpu_workers / batch_size lower)") from e
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
            "seconds": time.perf_counter() - start, "repaired": repaired, "sub_batch": sub_batch,
            "sha256": sha256_file(out)}


def written_here(path: Path, set_name: str) -> bool:
    """Whether ``path`` carries this pipeline's marks: a shard name of the set and samples with a job digest."""
    if not re.fullmatch(rf"{re.escape(set_name)}-[0-9]{{6}}\.tar", path.name):
        return False
    try:
        return all("job_digest" in meta for _, _, meta in shard_records(path))
    except (tarfile.TarError, OSError, ValueError, KeyError):
        return False


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
