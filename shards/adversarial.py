"""One generation work unit: attack every image of a clean shard and write the adversarial shard.

Pure computation (no orchestration): the generate flow maps it over devices; benchmarks call it directly.
"""

from __future__ import annotations

import functools
import hashlib
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from attacks import create_attack
from attacks.memory import auto_sub_batch, copy_bytes, warn_if_short
from common.files import sha256_file
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model
from shards import STOP, NotOurs, Stopped
from shards.job import ShardJob
from shards.shardset import ShardWriter, read_shard, shard_records, tar_samples


def shard_seed(seed: int, name: str) -> int:
    """A shard's seed depends on the run seed and the shard's name only, never on scheduling."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


@functools.lru_cache(maxsize=4)
def _surrogate(spec_json: str, weights_sha256: str | None, device: str):
    """The surrogate, built once per worker; ``weights_sha256`` only keys the cache (other bytes, another model)."""
    return build_model(ModelSpec.model_validate_json(spec_json), device=device)


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "can't allocate memory")))


def attack_shard_file(job: ShardJob, device: str, threads: int = 1,
                      on_batch: Callable[[int, int], None] | None = None,
                      on_step: Callable[[int, int, int, int], None] | None = None) -> dict[str, Any]:
    """Attack ``job.in_shard`` on ``device`` into ``job.out_shard``; a complete output of the same job is left alone.

    ``threads``: intra-op CPU threads (the caller gives every concurrent worker the same number).
    ``on_batch(done, total)`` is called after each batch; ``on_step(done, total, step, active)`` after each attack
    step. ``shards.STOP`` stops the job after its current step (:class:`shards.Stopped`), leaving no partial file.
    An existing output is kept only when it is this job's, complete, and has the checksum the set's SHA256SUMS
    recorded when it was made (``job.recorded_sha256``).
    """
    out = Path(job.out_shard)
    if STOP.is_set():
        raise Stopped(f"{out.name}: not started (stop requested)")
    if device == "cpu":
        torch.set_num_threads(threads)
    # keyed on the weights' hash too: a long-lived worker never attacks with weights a file no longer holds
    model = _surrogate(job.surrogate.model_dump_json(), job.surrogate_sha256, device)
    attack = create_attack(job.method, model, job.config, **job.attack_options)
    sub_batch, size = job.sub_batch, model.data_config["input_size"][-1]
    if sub_batch == "auto":
        sub_batch = auto_sub_batch(attack, size, device, job.workers_per_device)
        if sub_batch >= job.batch_size * attack.copies_per_image:
            sub_batch = 0  # everything fits in one pass: the same job as sub_batch 0
        warn_if_short(attack, size, device, sub_batch or job.batch_size * attack.copies_per_image,
                      job.workers_per_device)
    attack.config = replace(attack.config, sub_batch=sub_batch)
    # the policy auto resolved to: the same job on another device can be another job
    digest = job.digest(attack.config.precision, sub_batch)
    repaired = None
    if out.exists():
        found = _existing_output(out, digest, count=sum(1 for _ in tar_samples(job.in_shard)))
        checksum = sha256_file(out) if found.state == "complete" else None
        if job.recorded_sha256 and checksum not in (None, job.recorded_sha256):
            found = Found("damaged", "its checksum differs from the one SHA256SUMS recorded")
        if found.state == "complete":
            return {"shard": out.name, "skipped": True, "device": device, "sha256": checksum}
        if found.state == "foreign":
            raise NotOurs(f"{out}: not written by this pipeline; move it away or use another output folder")
        # made by another job (other inputs, parameters or weights), or damaged: made anew
        repaired = f"made by another job ({found.detail})" if found.state == "other job" else f"damaged ({found.detail})"
        out.unlink()
    clean = list(read_shard(job.in_shard))
    start, seed, count, steps = time.perf_counter(), shard_seed(job.seed, out.name), 0, 0

    def step_done(step: int, active: int) -> None:
        if STOP.is_set():
            raise Stopped(f"{out.name}: stopped at step {step}; {count}/{len(clean)} images were done")
        if on_step:
            on_step(count, len(clean), step, active)

    with ShardWriter(out) as sink:  # samples stream into <shard>.tmp; renamed only when the shard is complete
        for b in range(0, len(clean), job.batch_size):
            batch = clean[b : b + job.batch_size]
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
                provenance = {**s["json"], **rec, "surrogate": job.surrogate.name, "seed": seed + b,
                              "job_digest": digest, "eta": job.budget.eta, "eps": job.budget.eps,
                              "alpha": job.budget.alpha}
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


class Found(NamedTuple):
    """What an existing output is: ``complete`` (this job's, every sample), made by an ``other job``, ``foreign``
    (records without a job digest: not written here) or ``damaged``; ``detail`` says which job or what damage."""

    state: Literal["complete", "other job", "foreign", "damaged"]
    detail: str = ""


def _existing_output(out: Path, digest: str, count: int) -> Found:
    try:
        records = [meta for _, _, meta in shard_records(out)]
    except (tarfile.TarError, OSError, ValueError, KeyError) as e:  # truncated, zero bytes, garbled members
        return Found("damaged", f"unreadable: {e}")
    if not records:
        return Found("damaged", "no samples")
    made_with = {r.get("job_digest") for r in records}
    if None in made_with:
        return Found("foreign")
    if made_with != {digest}:
        return Found("other job", ", ".join(sorted(made_with)))
    if len(records) != count:
        return Found("damaged", f"{len(records)} samples, its clean shard has {count}")
    return Found("complete")
