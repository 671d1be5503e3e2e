"""Stage ``prepare``: index the source, select the subset, and write the clean centre crops as a shard set.

The clean set is what every attack reads and what evaluation compares against, so "clean" and "adversarial"
images go through exactly the same crop. Bad source files are skipped and listed in ``rejects.tsv``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from tqdm import tqdm

from pipelines.params import write_json
from shards.shardset import class_names, dataset_card_header, shard_name, write_index, write_shard
from sources.reading import (
    BadSourceError,
    Rejects,
    SourceSample,
    class_folder_source,
    file_sha256,
    label_file_source,
    load_crop,
)


def index_source(source: dict[str, Any], rejects: Rejects) -> list[SourceSample]:
    if source["kind"] == "class_folder":
        return class_folder_source(source["root"], rejects)[0]
    if source["kind"] == "label_file":
        return label_file_source(source["root"], source["label_file"], rejects, source.get("num_classes", 1000))
    raise ValueError(f"params.yaml: source.kind must be 'class_folder' or 'label_file', not {source['kind']!r}")


def select(samples: list[SourceSample], mode: str, n: int, seed: int) -> list[SourceSample]:
    """``all``; ``first`` n; ``per_class``: n per class drawn with ``seed``. Output is sorted by key (stable order)."""
    if mode == "all":
        chosen = samples
    elif mode == "first":
        chosen = samples[:n]
    elif mode == "per_class":
        by_class: dict[int, list[SourceSample]] = defaultdict(list)
        for s in samples:
            by_class[s.label].append(s)
        rng = random.Random(seed)
        chosen = [s for c in sorted(by_class) for s in rng.sample(by_class[c], min(n, len(by_class[c])))]
    else:
        raise ValueError(f"params.yaml: source.select.mode must be all, first or per_class, not {mode!r}")
    return sorted(chosen, key=lambda s: s.key)


def _swap_in(built: Path, out: Path) -> None:
    """Replace ``out`` by the complete set in ``built``; the old set is removed only after the new one is in place."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(built, out)
    shutil.rmtree(old, ignore_errors=True)


@flow(name="prepare", flow_run_name="prepare-{source[kind]}-{source[size]}px")
def prepare_flow(source: dict[str, Any], metrics_path: str = "metrics/prepare.json", strict: bool = False) -> dict:
    """Write the clean set into a temporary folder beside ``source.out`` and swap it in only when complete, so a
    failure (missing source, a ``--strict`` reject, a crash) leaves the previous set as it was."""
    out = Path(source["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
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
    get_run_logger().info("prepared %d clean crops in %d shards (%d rejected, see %s)", metrics["images"],
                          metrics["shards"], metrics["rejects"], out / "rejects.tsv")
    return metrics


def _build(source: dict[str, Any], out: Path, strict: bool) -> dict:
    rejects = Rejects(strict=strict)
    sel = source.get("select", {})
    samples = select(index_source(source, rejects), sel.get("mode", "all"), sel.get("n", 0), sel.get("seed", 0))
    buffer, shards, kept = [], 0, 0

    def flush():
        nonlocal buffer, shards
        write_shard(out / shard_name("clean", shards), buffer)
        buffer, shards = [], shards + 1

    for s in tqdm(samples, desc="prepare", unit="img", mininterval=2):
        try:
            image = load_crop(s.path, source["size"], source["crop_pct"], source["filter"], source.get("min_side", 16))
        except BadSourceError as e:
            rejects.add(e.path, e.reason)
            continue
        buffer.append({"key": s.key, "image": image, "cls": s.label,
                       "json": {"key": s.key, "label": s.label, "wnid": s.wnid, "source_file": s.path.name,
                                "source_sha256": file_sha256(s.path)}})
        kept += 1
        if len(buffer) == source["shard_size"]:
            flush()
    if buffer:
        flush()
    rejects.write(out / "rejects.tsv")
    header = dataset_card_header("clean", class_names(out), "clean crops (DAmageNet source images)")
    (out / "README.md").write_text(header + "\n" + _card(source, kept, len(rejects)))
    index = write_index(out, "clean")
    return {"images": kept, "rejects": len(rejects), "shards": index["shards"], "selected": len(samples)}


def _card(source: dict[str, Any], count: int, rejects: int) -> str:
    return f"""# Clean crops

The unattacked source images of this pipeline run, after the same crop every attack and evaluation uses:
resize the short side to floor({source['size']} / {source['crop_pct']}) with the {source['filter']} filter
(antialiased), then centre-crop {source['size']} x {source['size']}; stored as PNG (lossless).

- source: `{source['kind']}` at `{source['root']}`
- images: {count}; rejected source files: {rejects} (listed in `rejects.tsv` with the reason)
- sample fields: `png`, `cls`, `json` (key, label, WordNet id or class folder, sha256 of the source file)

Licence: these crops are derived from the source images and carry the source's licence and terms of use
(for ImageNet, non-commercial research use under the ImageNet terms).
"""
