"""Check a published shard set: checksums, counts, keys, PNG decoding, labels and (given the clean set) budgets."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from shards.shardset import decode_png, sha256_file, shard_paths, tar_samples


def verify_shardset(root: Path | str, num_classes: int, clean: Path | str | None = None) -> list[str]:
    """Return a list of problems (empty when the set is sound)."""
    root = Path(root)
    problems: list[str] = []
    sums_file = root / "SHA256SUMS"
    if not sums_file.is_file():
        return [f"{sums_file}: missing"]
    listed = {}
    for line in sums_file.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.strip()] = digest
    for name, digest in listed.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: listed in SHA256SUMS but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: checksum mismatch")
    for p in shard_paths(root):
        if p.name not in listed:
            problems.append(f"{p}: shard not listed in SHA256SUMS")
    info_path = root / "shardindex.json"
    expected = {}
    if info_path.is_file():
        expected = {s["url"]: s["nsamples"] for s in json.loads(info_path.read_text())["shardlist"]}
    reference = _clean_images(clean) if clean is not None else None
    seen: set[str] = set()
    for p in shard_paths(root):
        try:
            n = _check_shard(p, num_classes, seen, reference, problems)
        except (tarfile.TarError, OSError) as e:
            problems.append(f"{p}: unreadable tar ({e})")
            continue
        if p.name in expected and expected[p.name] != n:
            problems.append(f"{p}: {n} samples, index says {expected[p.name]}")
    if reference is not None and len(seen) != len(reference):
        missing = sorted(set(reference) - seen)
        problems.append(f"{root}: {len(missing)} clean key(s) have no adversarial image, e.g. {missing[:3]}")
    return problems


def _clean_images(clean: Path | str) -> dict[str, np.ndarray]:
    images = {}
    for p in shard_paths(clean):
        for key, fields in tar_samples(p):
            images[key] = decode_png(fields["png"])
    return images


def _check_shard(path: Path, num_classes: int, seen: set[str], reference, problems: list[str]) -> int:
    n = 0
    for key, fields in tar_samples(path):
        n += 1
        where = f"{path}:{key}"
        if key in seen:
            problems.append(f"{where}: duplicate key")
        seen.add(key)
        if set(fields) != {"png", "cls", "json"}:
            problems.append(f"{where}: fields {sorted(fields)}, expected cls, json, png")
            continue
        try:
            image = decode_png(fields["png"])
        except Exception as e:  # noqa: BLE001  (any decoding failure is a problem to report)
            problems.append(f"{where}: PNG does not decode ({e})")
            continue
        try:
            label, meta = int(fields["cls"]), json.loads(fields["json"])
        except ValueError as e:
            problems.append(f"{where}: unreadable cls/json ({e})")
            continue
        if not 0 <= label < num_classes:
            problems.append(f"{where}: label {label} outside 0..{num_classes - 1}")
        if reference is not None and "eta" in meta:
            if key not in reference:
                problems.append(f"{where}: no clean image with this key")
                continue
            diff = image.astype(np.float64) - reference[key]
            rmsd, linf = float(np.sqrt((diff**2).mean())), float(np.abs(diff).max())
            if rmsd > meta["eta"] + 1e-6:
                problems.append(f"{where}: RMSD {rmsd:.3f} exceeds budget {meta['eta']}")
            if linf > meta["eps"] + 1e-6:
                problems.append(f"{where}: L-inf {linf:.0f} exceeds budget {meta['eps']}")
    return n
