"""Check a published shard set: checksums, counts, keys, PNG decoding, image size, labels, the dataset card against
the set and (given the clean set and the run's budget) every image's label and budget. Every problem becomes one line naming the file; nothing in a
damaged set makes the check itself crash."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from shards.card import card_problems
from shards.shardset import (
    FIELDS,
    INDEX_FILES,
    MAX_MEMBER_BYTES,
    decode_png,
    index_files,
    sha256_file,
    shard_paths,
    tar_samples,
)

_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def verify_shardset(root: Path | str, num_classes: int, clean: Path | str | None = None,
                    budget: dict | None = None, size: int | None = None) -> list[str]:
    """Return a list of problems (empty when the set is sound).

    ``budget`` (``eta``, ``eps`` on the 0-255 scale, from the run's parameters, never from the samples) enables
    the budget checks against ``clean``; ``clean`` also checks each label against the clean image's. ``size`` is
    the expected image side (default: the set's most common image size)."""
    root = Path(root)
    problems = verify_files(root)
    sample_problems, records = _verify_samples(root, num_classes, clean, budget, size)
    return problems + sample_problems + card_problems(root, records)


def verify_files(root: Path | str) -> list[str]:
    """The set is exactly the files ``SHA256SUMS`` lists, each once and inside the set, with the listed checksums,
    and its index files say what its shards hold (cheap: no image is decoded)."""
    root = Path(root)
    problems: list[str] = []
    listed = read_sums(root / "SHA256SUMS", problems)
    for name, digest in listed.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: listed in SHA256SUMS but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: checksum mismatch")
    for p in sorted(root.iterdir()) if root.is_dir() else []:  # the set is exactly the files it lists
        if p.name != "SHA256SUMS" and p.name not in listed:
            problems.append(f"{p}: not listed in SHA256SUMS (not part of the set)")
    for name in INDEX_FILES:
        if name not in listed:
            problems.append(f"{root / name}: not listed in SHA256SUMS")
    _check_index_files(root, problems)
    return problems


def _verify_samples(root: Path, num_classes: int, clean, budget, size) -> tuple[list[str], list[dict] | None]:
    """The samples' problems, and their JSON records (None when some sample could not be read: the card's numbers
    cannot then be checked)."""
    problems: list[str] = []
    records: list[dict] = []
    read_all = True
    expected = _read_index(root / "shardindex.json", problems)
    reference = _clean_samples(clean, problems) if clean is not None else None
    seen: set[str] = set()
    shapes: dict[str, tuple] = {}
    # no member may be larger than an image of the set's size can be as a PNG (raw pixels plus headers)
    max_member = 2 * size * size * 3 + (1 << 16) if size else MAX_MEMBER_BYTES
    for p in shard_paths(root):
        try:
            n = _check_shard(p, num_classes, seen, reference, budget, shapes, problems, max_member, records)
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            problems.append(f"{p}: unreadable tar ({e})")
            read_all = False
            continue
        if p.name in expected and expected[p.name] != n:
            problems.append(f"{p}: {n} samples, index says {expected[p.name]}")
    if shapes:
        expected_shape = (size, size, 3) if size else Counter(shapes.values()).most_common(1)[0][0]
        problems += [f"{where}: image {s[1]}x{s[0]}, the set's images are {expected_shape[1]}x{expected_shape[0]}"
                     for where, s in shapes.items() if s != expected_shape]
    if reference is not None and len(seen) != len(reference):
        missing = sorted(set(reference) - seen)
        problems.append(f"{root}: {len(missing)} clean key(s) have no adversarial image, e.g. {missing[:3]}")
    return problems, records if read_all and len(records) == len(seen) else None


def read_sums(path: Path, problems: list[str]) -> dict[str, str]:
    """``{file name: sha256}`` from a ``SHA256SUMS`` file; a missing file, a malformed or repeated line and a name
    outside the set are left out and described in ``problems``."""
    if not path.is_file():
        problems.append(f"{path}: missing")
        return {}
    listed, lines = {}, {}
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        m = _SUMS_LINE.fullmatch(line)
        if not m:
            problems.append(f"{path}:{lineno}: malformed line {line[:80]!r} (expected '<sha256>  <file>')")
            continue
        name = m.group(2)
        if name in (".", "..") or "/" in name or "\\" in name:  # never read a file outside the set
            problems.append(f"{path}:{lineno}: {name!r} is not a file name inside the set; not checked")
        elif name in listed:
            problems.append(f"{path}:{lineno}: {name} is listed again (first on line {lines[name]})")
        else:
            listed[name], lines[name] = m.group(1), lineno
    return listed


def _check_index_files(root: Path, problems: list[str]) -> None:
    """The index files must say what the shards hold: recomputed from the shards and compared byte for byte."""
    shards = shard_paths(root)
    if not shards:
        return
    set_name = shards[0].name.rsplit("-", 1)[0]
    try:
        expected = index_files(root, set_name, shards)
    except (tarfile.TarError, OSError, ValueError, KeyError):
        return  # an unreadable shard is reported by the shard checks
    for name, text in expected.items():
        path = root / name
        if path.is_file() and path.read_text(errors="replace") != text:
            problems.append(f"{path}: does not match the shards (edited or stale)")


def _read_index(path: Path, problems: list[str]) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        return {s["url"]: int(s["nsamples"]) for s in json.loads(path.read_text())["shardlist"]}
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{path}: unreadable wids index ({type(e).__name__}: {e})")
        return {}


def _clean_samples(clean: Path | str, problems: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    samples = {}
    for p in shard_paths(clean):
        try:
            for key, fields in tar_samples(p):
                samples[key] = decode_png(fields["png"]), int(fields["cls"])
        except (tarfile.TarError, OSError, ValueError, KeyError) as e:
            problems.append(f"{p}: clean shard unreadable ({e}); its keys are not checked")
    return samples


def _check_shard(path: Path, num_classes: int, seen: set[str], reference, budget, shapes: dict, problems,
                 max_member: int, records: list[dict]) -> int:
    n = 0
    for key, fields in tar_samples(path, max_member):  # raises on non-file, oversized and adjacent duplicate members
        n += 1
        where = f"{path}:{key}"
        if key in seen:
            problems.append(f"{where}: duplicate key")
        seen.add(key)
        if set(fields) != FIELDS:
            problems.append(f"{where}: fields {sorted(fields)}, expected {', '.join(sorted(FIELDS))}")
            continue
        try:
            image = decode_png(fields["png"])
        except Exception as e:  # noqa: BLE001  (any decoding failure is a problem to report)
            problems.append(f"{where}: PNG does not decode ({e})")
            continue
        try:
            label = int(fields["cls"])
            records.append(json.loads(fields["json"]))
        except ValueError as e:
            problems.append(f"{where}: unreadable cls/json ({e})")
            continue
        shapes[where] = image.shape
        if not 0 <= label < num_classes:
            problems.append(f"{where}: label {label} outside 0..{num_classes - 1}")
        if reference is None:
            continue
        if key not in reference:
            problems.append(f"{where}: no clean image with this key")
            continue
        clean_image, clean_label = reference[key]
        if label != clean_label:
            problems.append(f"{where}: label {label}, the clean image's label is {clean_label}")
        if clean_image.shape != image.shape:
            problems.append(f"{where}: image {image.shape[1]}x{image.shape[0]}, its clean image is "
                            f"{clean_image.shape[1]}x{clean_image.shape[0]}")
            continue
        if budget is not None:
            diff = image.astype(np.float64) - clean_image
            rmsd, linf = float(np.sqrt((diff**2).mean())), float(np.abs(diff).max())
            if rmsd > budget["eta"] + 1e-6:
                problems.append(f"{where}: RMSD {rmsd:.3f} exceeds the run's budget {budget['eta']}")
            if linf > budget["eps"] + 1e-6:
                problems.append(f"{where}: L-inf {linf:.0f} exceeds the run's budget {budget['eps']}")
    return n
