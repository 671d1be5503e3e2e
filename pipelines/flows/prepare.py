"""Stage ``prepare``: index the source, select the subset, and write the clean centre crops as a shard set.

The clean set is what every attack reads and what evaluation compares against, so "clean" and "adversarial"
images go through exactly the same crop. Bad source files are skipped and listed in ``rejects.tsv``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger
from tqdm import tqdm

from common.files import sha256_file, write_json
from pipelines.config import ConfigError, Select, Source
from shards.card import card_data, write_card
from shards.shardset import shard_name, shard_paths, shard_records, write_index, write_shard
from sources import BadSourceError
from sources.containers import container_source, member_bytes
from sources.reading import (
    Rejects,
    SourceSample,
    class_folder_source,
    label_file_source,
    load_crop,
    read_label_sets,
)


def index_source(source: Source, rejects: Rejects) -> list[SourceSample]:
    if source.kind == "class_folder":
        return class_folder_source(source.root, rejects)[0]
    if source.kind in ("hf_dataset", "wds"):
        return container_source(source.kind, source.root, rejects, source.num_classes)
    return label_file_source(source.root, source.label_file, rejects, source.num_classes, source.kind)


def read_sample(s: SourceSample, source: Source) -> tuple:
    """One source image as its clean crop and the sha256 of the bytes it was read from (a file, or an image stored
    inside a parquet or tar file: the same sum as that image's own file)."""
    if s.member is None:
        return load_crop(s.path, source.size, source.crop_pct, source.filter, source.min_side), sha256_file(s.path)
    data = member_bytes(s)
    return (load_crop(s.where, source.size, source.crop_pct, source.filter, source.min_side, data=data),
            hashlib.sha256(data).hexdigest())


def select(samples: list[SourceSample], sel: Select) -> list[SourceSample]:
    """``all``; ``first`` n; ``per_class``: n per class drawn with ``seed``. Output is sorted by key (stable order)."""
    if sel.mode == "all":
        chosen = samples
    elif sel.mode == "first":
        chosen = samples[: sel.n]
    else:  # per_class
        by_class: dict[int, list[SourceSample]] = defaultdict(list)
        for s in samples:
            by_class[s.label].append(s)
        rng = random.Random(sel.seed)
        chosen = [s for c in sorted(by_class) for s in rng.sample(by_class[c], min(sel.n, len(by_class[c])))]
    return sorted(chosen, key=lambda s: s.key)


SET_FILE = re.compile(r"(clean-\d{6}\.tar|shardindex\.json|_info\.json|manifest\.jsonl|SHA256SUMS|README\.md|"
                      r"rejects\.tsv)")  # every file a clean set holds: what prepare may replace


def check_output_folder(source: Source) -> None:
    """Refuse an output that would destroy data: ``out`` equal to, inside or holding the source root, or an
    existing folder with files this stage did not write (named)."""
    root, out = Path(source.root).resolve(), Path(source.out).resolve()
    if out == root or root in out.parents or out in root.parents:
        raise ConfigError(f"source.out ({source.out}) {'is' if out == root else 'overlaps'} source.root "
                          f"({source.root}): the clean set replaces its folder, so it must lie outside the images")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not SET_FILE.fullmatch(p.name))
        if foreign:
            raise ConfigError(f"source.out ({source.out}) holds files the prepare stage did not write "
                              f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); it replaces that "
                              "folder whole: choose an empty or new folder")


def _swap_in(built: Path, out: Path) -> None:
    """Replace ``out`` by the complete set in ``built``; the old set is removed only after the new one is in place."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(built, out)
    shutil.rmtree(old, ignore_errors=True)


@flow(name="prepare", flow_run_name="prepare-{profile}")
def prepare_flow(source: Source, metrics_path: str = "metrics/prepare.json", strict: bool = False,
                 profile: str = "demo") -> dict:
    """Write the clean set into a temporary folder beside ``source.out`` and swap it in only when complete, so a
    failure (missing source, a ``--strict`` reject, a crash) leaves the previous set as it was."""
    out = Path(source.out)
    check_output_folder(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.parent / f".{out.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RuntimeError(f"{out}: another prepare run is writing this set (lock {lock.lock_file})") from None
    try:
        return _prepare(source, out, metrics_path, strict)
    finally:
        lock.release()


def _prepare(source: Source, out: Path, metrics_path: str, strict: bool) -> dict:
    log = get_run_logger()
    for stale in out.parent.glob(f".{out.name}.building-*"):  # a killed run's; we hold the lock, so none is live
        log.warning("removing %s, left by an interrupted prepare run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    building.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published set gets the usual permissions
    try:
        metrics = _build(source, building, strict)
        _swap_in(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    write_json(metrics_path, metrics)
    log.info("prepared %d clean crops in %d shards (%d rejected, see %s)", metrics["images"],
                          metrics["shards"], metrics["rejects"], out / "rejects.tsv")
    return metrics


def _kept_rejects(source: Source, rejects: Rejects) -> str:
    """A failed run's rejects, written beside the output (its building folder is dropped): the first reasons and
    where the rest are."""
    path = Path(str(source.out).rstrip("/") + ".rejects.tsv")
    rejects.write(path)
    reasons = sorted({r for _, r in rejects.items})
    return f"{'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''}; every file in {path}"


def _build(source: Source, out: Path, strict: bool) -> dict:
    rejects = Rejects(strict=strict)
    sel = source.select
    indexed = index_source(source, rejects)
    labels = sorted({s.label for s in indexed})
    if labels and labels[-1] >= source.num_classes:
        raise ConfigError(f"source.root ({source.root}) has label {labels[-1]} (of {len(labels)} classes) but "
                          f"source.num_classes is {source.num_classes}: set num_classes or remove the extra "
                          "class folders")
    # read against every indexed image: a list in file-name order is aligned before the selection
    label_sets = (read_label_sets(source.label_sets, indexed, source.num_classes)
                  if source.label_sets else {})
    samples = select(indexed, sel)
    if not samples:
        raise ConfigError(f"source: nothing selected from {len(indexed)} indexed image(s) (select: {sel.model_dump()})"
                          + (f"; {len(rejects)} file(s) rejected ({_kept_rejects(source, rejects)})" if len(rejects)
                             else "") + "; the previous clean set is kept")
    buffer, shards, kept = [], 0, 0

    def flush():
        nonlocal buffer, shards
        write_shard(out / shard_name("clean", shards), buffer)
        buffer, shards = [], shards + 1

    for s in tqdm(samples, desc="prepare", unit="img", mininterval=2):
        try:
            image, sha256 = read_sample(s, source)
        except BadSourceError as e:
            rejects.add(e.path, e.reason)
            continue
        buffer.append({"key": s.key, "image": image, "cls": s.label,
                       "json": {"key": s.key, "label": s.label, "wnid": s.wnid, "source_file": s.name,
                                "source_sha256": sha256,
                                **({"label_set": label_sets[s.key]} if s.key in label_sets else {})}})
        kept += 1
        if len(buffer) == source.shard_size:
            flush()
    if buffer:
        flush()
    if not kept:  # an empty set never replaces a good one
        raise BadSourceError(source.root, f"all {len(samples)} selected image(s) were rejected "
                             f"({_kept_rejects(source, rejects)}); the previous clean set is kept")
    rejects.write(out / "rejects.tsv")
    with_set = sum(bool(label_sets.get(s.key)) for s in samples)
    records = [meta for p in shard_paths(out) for _, _, meta in shard_records(p)]
    write_card(out, card_data(out, records, source.license.model_dump(), [source.source_dataset],
                              "clean crops (DAmageNet source images)", {"source": {
                                  "kind": source.kind, "root": source.root, "size": source.size,
                                  "crop_pct": source.crop_pct, "filter": source.filter, "images": kept,
                                  "rejects": len(rejects), "label_sets": source.label_sets,
                                  "with_label_set": with_set}}))
    index = write_index(out, "clean")
    return {"images": kept, "rejects": len(rejects), "shards": index["shards"], "selected": len(samples),
            **({"label_sets": with_set} if source.label_sets else {})}
