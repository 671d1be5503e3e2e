"""Stage ``generate``: run one attack over the clean shard set, one Prefect task per shard, into a new shard set.

Work units are shards: unit i reads ``clean-00000i.tar`` and writes ``<attack>-00000i.tar`` with the same keys in
the same order. Units are mapped over workers: one per visible GPU (each task pinned to its device), or CPU
threads when there is none; with a Dask address (or a local cluster size) the same tasks run on Dask through
prefect-dask. A unit that fails is retried once on the next device and reported; the others still complete.

Output bytes depend only on the inputs and parameters: each shard's seed comes from the run seed and the shard
name, batches are fixed per shard, and a complete shard is never rewritten. CPU intra-op threads change the last
bits of a gradient, so they are a parameter: ``cpu_threads=1`` gives the same bytes for any number of CPU workers;
``"auto"`` shares the cores among the workers that can run at once (cores / min(workers, shards), faster when there
are fewer shards than cores) and gives the same bytes for the same workers on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from attacks import AttackConfig, list_attacks
from common.budget import Budget
from common.files import sha256_file, write_json
from model_zoo.spec import ModelSpec
from model_zoo.zoo import weights_sha256
from pipelines.config import Dask
from pipelines.flows import artifact_key
from pipelines.prefect_api import unreachable_api
from pipelines.progress import RUNNING, Progress
from pipelines.stages import resolve_devices
from shards import STOP, NotOurs, Stopped
from shards.adversarial import attack_shard_file, written_here
from shards.card import attack_numbers, attack_parameters, card_data, card_license, read_card, write_card
from shards.job import ShardJob, split_options
from shards.shardset import (
    shard_name,
    shard_paths,
    shard_records,
    write_index,
    write_sums,
)
from shards.verify import read_sums


def _shard_task_name() -> str:
    from prefect.runtime import task_run

    return f"attack-{task_run.parameters['job'].name}"  # e.g. attack-aoa-000003


@task(name="attack-shard", task_run_name=_shard_task_name)
def attack_shard(job: ShardJob, device: str, threads: int = 1) -> dict[str, Any]:
    """Attack one clean shard on ``device`` and write the adversarial shard (skipped when already complete)."""
    # imported here, not taken from this module's globals: Dask pickles the task by value
    from prefect.runtime import flow_run

    from pipelines.progress import RUNNING

    log, name, start = get_run_logger(), job.name, time.perf_counter()
    progress, last_log = RUNNING.get(str(flow_run.id)), [start]
    max_steps = job.config.max_steps

    def batch_done(done: int, total: int) -> None:
        log.info("%s: %d/%d images (%.0f s)", name, done, total, time.perf_counter() - start)

    def step_done(done: int, total: int, step: int, active: int) -> None:
        batch = min(job.batch_size, total - done)
        if progress:  # a batch's share grows with its steps (most images finish before max_steps)
            progress.update(name, (done + batch * step / max_steps) / total)
        if time.perf_counter() - last_log[0] > 30:  # a CPU batch can take minutes: say where it is
            last_log[0] = time.perf_counter()
            log.info("%s: images %d-%d of %d, step %d: %d still inside the budget (%.0f s)", name, done + 1,
                     done + batch, total, step, active, last_log[0] - start)

    result = attack_shard_file(job, device, threads, on_batch=batch_done, on_step=step_done)
    if progress:
        progress.update(name, 1.0, force=True)
    return result


def threads_per_cpu_worker(devices: list[str], units: int) -> int:
    """Intra-op threads for each CPU worker: the cores shared by the workers that can run at once (fewer units
    than workers leave cores to the ones that run)."""
    workers = min(sum(d == "cpu" for d in devices), units) or 1
    return max(1, (os.cpu_count() or 1) // workers)


def _task_runner(dask: Dask | None, workers: int):
    if dask and (dask.address or dask.n_workers):
        from prefect_dask import DaskTaskRunner

        if dask.address:
            return DaskTaskRunner(address=dask.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask.n_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=workers)


def generate(attack: str, budget: Budget, options: dict[str, Any], surrogate: ModelSpec, clean_dir: str,
             out_dir: str, *, method: str | None = None, sub_batch: int | Literal["auto"] = "auto",
             batch_size: int = 50, devices: str | list[str] = "auto", cpu_workers: int = 2, dask: Dask | None = None,
             cpu_threads: int | Literal["auto"] = "auto", seed: int = 0, metrics_path: str | None = None,
             profile: str = "demo") -> dict[str, Any]:
    """Run :func:`generate_flow` on the workers chosen by ``devices`` (``auto``: every visible GPU, else
    ``cpu_workers`` CPU threads) or on Dask (``dask``: a scheduler address or a local cluster size)."""
    device_list = resolve_devices(devices, cpu_workers)
    runner = _task_runner(dask, len(device_list))
    return generate_flow.with_options(task_runner=runner)(
        attack, budget, options, surrogate, clean_dir, out_dir, method=method, sub_batch=sub_batch,
        batch_size=batch_size, devices=device_list, cpu_threads=cpu_threads, seed=seed, metrics_path=metrics_path,
        profile=profile)


@flow(name="generate", flow_run_name="generate-{profile}-{attack}")
def generate_flow(attack: str, budget: Budget, options: dict[str, Any], surrogate: ModelSpec, clean_dir: str,
                  out_dir: str, method: str | None = None, sub_batch: int | Literal["auto"] = "auto",
                  batch_size: int = 50, devices: list[str] | None = None, cpu_threads: int | Literal["auto"] = "auto",
                  seed: int = 0, metrics_path: str | None = None, profile: str = "demo") -> dict[str, Any]:
    """Attack every clean shard of ``clean_dir`` into ``out_dir``, one task per shard, mapped over ``devices``.
    ``attack`` names the set (its shards and metrics); ``method`` is the attack it runs (default: the same name);
    ``options`` are the set's own (the method's constructor options and shared config fields)."""
    method = method or attack
    if method not in list_attacks():
        raise KeyError(f"unknown attack {method!r}; known attacks: {', '.join(list_attacks())}")
    config, attack_options = split_options(attack, method, budget, options)
    devices = devices or ["cpu"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.parent / f".{out.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"{out}: another generate run is writing this set (lock {lock.lock_file}); wait for it "
                           "to finish or use another output folder") from None
    try:
        jobs = _shard_jobs(attack, method, config, attack_options, budget, surrogate, clean_dir, out, batch_size,
                           seed, sub_batch, devices)
        threads = threads_per_cpu_worker(devices, len(jobs)) if cpu_threads == "auto" else int(cpu_threads)
        with _stop_after_step_on_signals():
            return _generate(jobs, attack, clean_dir, devices, threads, out, metrics_path,
                             artifact_key(profile, f"generate-{attack}"))
    finally:
        lock.release()


@contextlib.contextmanager
def _stop_after_step_on_signals():
    """While the flow runs, SIGINT and SIGTERM set ``shards.STOP``: every job stops after its current attack step,
    finished shards stay, unfinished ones are deleted, and the flow ends Failed. (Prefect's own SIGTERM handler
    would end only this thread and leave the workers attacking.) A second signal gets the handler from before."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    log = get_run_logger()

    def stop(signum, frame):
        STOP.set()
        log.warning("%s: stopping after the current attack step, finished shards kept (signal again to stop at "
                    "once)", signal.Signals(signum).name)
        for s, handler in previous.items():
            signal.signal(s, handler)

    STOP.clear()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _shard_jobs(attack: str, method: str, config: AttackConfig, attack_options: dict[str, Any], budget: Budget,
                surrogate: ModelSpec, clean_dir: str, out: Path, batch_size: int, seed: int,
                sub_batch: int | Literal["auto"], devices: list[str]) -> list[ShardJob]:
    """One job per clean shard (output ``<attack>-00000i.tar``), with what earlier runs recorded of the shards they
    finished; an earlier run's shard whose clean shard is gone is removed (only if this pipeline wrote it)."""
    inputs = shard_paths(clean_dir)
    if not inputs:
        raise FileNotFoundError(f"{clean_dir}: no clean shards (run the prepare stage first)")
    surrogate_sha256 = weights_sha256(surrogate)  # hashed once: a VGG19 file is half a gigabyte
    recorded = read_sums(out / "SHA256SUMS", problems=[])  # an unreadable line records nothing: made anew
    jobs = [ShardJob(
        in_shard=str(p), out_shard=str(out / shard_name(attack, i)), in_sha256=sha256_file(p), method=method,
        config=config, attack_options=attack_options, budget=budget, surrogate=surrogate,
        surrogate_sha256=surrogate_sha256, batch_size=batch_size, seed=seed, sub_batch=sub_batch,
        workers_per_device=_workers_per_device(devices, devices[i % len(devices)], len(inputs)),
        recorded_sha256=recorded.get(shard_name(attack, i)),
    ) for i, p in enumerate(inputs)]
    stale = sorted(set(shard_paths(out)) - {Path(j.out_shard) for j in jobs})  # from a larger clean set, or not ours
    for path in stale:
        if not written_here(path, attack):
            raise NotOurs(f"{path}: not a shard this pipeline wrote for {attack!r}; move it out of {out} (nothing "
                          "was removed)")
    for path in stale:
        get_run_logger().warning("removing %s: its clean shard no longer exists", path)
        path.unlink()
    return jobs


def _generate(jobs: list[ShardJob], attack: str, clean_dir: str, devices: list[str], threads: int, out: Path,
              metrics_path: str | None, progress_key: str) -> dict[str, Any]:
    """Run the jobs and write the set's metrics; a job that failed twice fails the run (the others are kept),
    else the set gets its card and index."""
    log = get_run_logger()
    start = time.perf_counter()
    results, failed = _run_units(jobs, devices, threads, log, f"generate {attack}", out, progress_key)
    wall = time.perf_counter() - start
    for r in results:
        if r.get("repaired"):
            log.warning("%s was %s and has been made anew", r["shard"], r["repaired"])
    done = [r for r in results if not r["skipped"]]
    failed_outputs = {j.out_shard for j in failed}
    finished = [Path(j.out_shard) for j in jobs if Path(j.out_shard).exists() and j.out_shard not in failed_outputs]
    records = [meta for p in finished for _, _, meta in shard_records(p)]
    metrics = _metrics(records, attack, done, wall)
    metrics["failed_units"] = sorted(Path(j.out_shard).name for j in failed)
    if metrics_path and metrics.get("images_per_second") is None:  # nothing made now: the rate of the run that did
        metrics["images_per_second"] = _previous_rate(Path(metrics_path), metrics.get("images"))
    if metrics_path:
        write_json(metrics_path, metrics)
    if failed:
        raise RuntimeError(f"generate {attack}: {len(failed)} unit(s) failed after retry: {metrics['failed_units']}; "
                           f"the other {len(jobs) - len(failed)} shards are complete and kept")
    write_card(out, _card(out, records, jobs[0], attack, clean_dir))
    write_index(out, attack, [Path(j.out_shard) for j in jobs])
    log.info("generate %s: %d images, %d shards written, %d already complete", attack, metrics["images"],
             len(done), len(results) - len(done))
    return metrics


def _workers_per_device(devices: list[str], device: str, units: int) -> int:
    """How many workers share ``device`` at once (the CPU's workers, or one GPU listed several times)."""
    return min(devices.count(device), units) or 1


def _run_units(jobs: list[ShardJob], devices: list[str], threads: int, log, desc: str, out: Path, key: str):
    """Submit every job; retry each failure once on the next device (a lost Prefect API ends the run at once).
    Returns (results, jobs that still failed).
    Progress: a terminal bar per finished shard, a Prefect progress artifact that also moves with the attack steps,
    per-batch (and, on slow batches, per-step) lines in the task logs. After ``shards.STOP`` (a signal), nothing is
    retried: the run stops with every finished shard kept."""
    from prefect.runtime import flow_run

    progress = RUNNING[str(flow_run.id)] = Progress(key, desc, len(jobs))
    futures = [(job, devices[i % len(devices)], attack_shard.submit(job, devices[i % len(devices)], threads))
               for i, job in enumerate(jobs)]
    results, retry, sums = [], [], {}
    try:
        for job, dev, fut in tqdm(futures, desc=desc, unit="shard"):
            try:
                results.append(fut.result())
                sums[results[-1]["shard"]] = results[-1]["sha256"]
                write_sums(out, dict(sorted(sums.items())))  # a resume checks kept shards against it
            except Exception as e:  # noqa: BLE001  (any failure of a unit is reported and retried)
                if unreachable_api(e):  # no unit can finish without the API: stop now, the finished shards are kept
                    raise
                if not STOP.is_set():
                    log.warning("unit %s failed on %s: %s", job.name, dev, e)
                retry.append((job, devices[(devices.index(dev) + 1) % len(devices)]))
            progress.update(job.name, 1.0, force=True)
    finally:
        RUNNING.pop(str(flow_run.id), None)
    if STOP.is_set():
        raise Stopped(f"{desc}: stopped on request; {len(results)} of {len(jobs)} shards are complete and kept, "
                      "the rest will be made by the next run")
    failed = []
    for job, dev in retry:
        try:
            results.append(attack_shard.submit(job, dev, threads).result())
            sums[results[-1]["shard"]] = results[-1]["sha256"]
            write_sums(out, dict(sorted(sums.items())))
            log.info("unit %s succeeded on retry on %s", job.name, dev)
        except Exception as e:  # noqa: BLE001
            log.error("unit %s failed again on %s: %s", job.name, dev, e)
            failed.append(job)
    return results, failed


def _previous_rate(path: Path, images: int | None) -> float | None:
    """The generation rate an earlier run recorded for the same number of images (None if none or unreadable)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return previous.get("images_per_second") if isinstance(previous, dict) and previous.get("images") == images else None


def _metrics(records: list[dict], attack: str, done: list[dict], wall: float) -> dict[str, Any]:
    if not records:
        return {"attack": attack, "images": 0}
    written = sum(r["count"] for r in done)
    return {"attack": attack, **attack_numbers(records),
            "images_per_second": round(written / wall, 3) if written else None}


def _card(out: Path, records: list[dict], job: ShardJob, attack: str, clean_dir: str) -> dict[str, Any]:
    """The set's card (from its records and any one job: they share all but paths); its licence and source datasets
    are those of the clean set it was made from."""
    clean = read_card(clean_dir)
    made_by = {"method": job.method, "surrogate": job.surrogate.name, "surrogate_arch": job.surrogate.arch,
               "clean_set": str(clean_dir), "budget": job.budget.model_dump()}
    return card_data(out, records, card_license(clean), clean.source_datasets,
                     f"{attack} adversarial images (DAmageNet-style)",
                     {"attack": made_by, "parameters": attack_parameters({**job.config.__dict__, **job.attack_options}),
                      "numbers": attack_numbers(records)})
