"""Labels of a flat folder of ImageNet val images, in the forms ImageNet is distributed with: each reader gives
``{file name: (where, class index)}`` in timm's order (the sorted WordNet ids), and names a file it cannot read.

- ``label_file``: ``name index`` lines (Caffe's and the official DAmageNet ``val.txt``);
- ``devkit``: the ILSVRC2012 devkit (its folder, or the tarball): ``data/ILSVRC2012_validation_ground_truth.txt``
  holds one ILSVRC2012_ID per image in file order (line i is ``ILSVRC2012_val_<i:08d>.JPEG``), and
  ``data/meta.mat`` maps those ids, whose order is not timm's, to WordNet ids;
- ``kaggle``: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the string ``wnid x1 y1 x2 y2`` per
  box): several boxes of one WordNet id are one label; two different ids for one image are refused.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
import tarfile
from pathlib import Path

from sources import BadSourceError

Listed = dict[str, tuple[str, int | None]]  # None: named, but refused (the reason is in the rejects)


def read_labels(kind: str, path: Path, synsets: list[str] | None, rejects) -> Listed:
    """The labels ``path`` gives, read as ``kind`` says (``synsets``: the WordNet ids in index order, needed by the
    devkit and Kaggle forms, which name classes by WordNet id)."""
    if not path.exists():
        raise BadSourceError(path, "label file does not exist")
    if kind == "label_file":
        return _val_txt(path, rejects)
    if synsets is None:
        raise BadSourceError(path, f"source.kind {kind} names classes by WordNet id: source.num_classes must be 1000")
    index = {w: i for i, w in enumerate(synsets)}
    return _devkit(path, index) if kind == "devkit" else _kaggle(path, index, rejects)


def _val_txt(path: Path, rejects) -> Listed:
    listed: Listed = {}
    lines = path.read_bytes().splitlines()
    malformed = []
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            rejects.add(where, f"line is not valid UTF-8 ({raw[:40]!r})")
            continue
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"-?[0-9]+", parts[1]):
            malformed.append((where, line))
            continue
        # "./a.png" is a.png: the name as the folder listing sees it (it was indexed and also "not listed")
        name, label = posixpath.normpath(parts[0]), int(parts[1])
        if name in listed:  # which label is right cannot be told: the file must be fixed
            first, first_label = listed[name]
            raise BadSourceError(path, f"lines {first.rsplit(':', 1)[1]} and {lineno} both name {name!r}" + (
                f" (labels {first_label} and {label})" if label != first_label else "") + ": keep one line per image")
        listed[name] = (where, label)
    if malformed and len(malformed) * 2 > len(malformed) + len(listed):  # mostly another format: say which
        raise BadSourceError(path, f"{len(malformed)} of {len(malformed) + len(listed)} lines are not 'name index' "
                                   f"(first: {malformed[0][1][:60]!r}); {guess_format(path)}")
    for where, line in malformed:
        rejects.add(where, f"malformed line {line!r}: expected 'name index'")
    return listed


def guess_format(path: Path) -> str:
    """Which distributed form a label file looks like, and the ``source.kind`` that reads it."""
    head = path.read_bytes()[:4096].decode("utf-8", errors="replace").splitlines()
    lines = [line.strip() for line in head if line.strip()]
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        return ("it looks like Kaggle's LOC_val_solution.csv: set source.kind: kaggle (source.label_file: this "
                "file)")
    if lines and all(re.fullmatch(r"[0-9]+", line) for line in lines[:50]):
        return ("it looks like the devkit's ILSVRC2012_validation_ground_truth.txt (one class id per image, ids of "
                "the devkit's meta.mat): set source.kind: devkit and source.label_file: the devkit folder or tarball")
    return "expected one 'name index' line per image (source.kind: label_file), as Caffe's and DAmageNet's val.txt"


def _devkit(path: Path, index: dict[str, int]) -> Listed:
    ground_truth, meta = _devkit_files(path)
    wnid_of = _meta_wnids(meta, path)
    listed: Listed = {}
    where = f"{path}: data/ILSVRC2012_validation_ground_truth.txt"
    for lineno, line in enumerate(ground_truth.splitlines(), 1):
        if not line.strip():
            continue
        if not re.fullmatch(r"\s*[0-9]+\s*", line) or int(line) not in wnid_of:
            raise BadSourceError(path, f"ILSVRC2012_validation_ground_truth.txt line {lineno}: {line[:40]!r} is not "
                                       "an ILSVRC2012_ID of meta.mat")
        wnid = wnid_of[int(line)]
        if wnid not in index:
            raise BadSourceError(path, f"meta.mat: {wnid} (ILSVRC2012_ID {int(line)}) is not an ImageNet-1k class")
        listed[f"ILSVRC2012_val_{lineno:08d}.JPEG"] = (f"{where}:{lineno}", index[wnid])
    return listed


def _devkit_files(path: Path) -> tuple[str, bytes]:
    """The ground-truth text and meta.mat bytes of a devkit folder or tarball (``.../data/<name>`` inside)."""
    names = ("ILSVRC2012_validation_ground_truth.txt", "meta.mat")
    if path.is_dir():
        found = {n: path / "data" / n for n in names}
        missing = [str(p) for p in found.values() if not p.is_file()]
        if missing:
            raise BadSourceError(path, f"not an ILSVRC2012 devkit folder: {', '.join(missing)} missing")
        return found[names[0]].read_text(), found[names[1]].read_bytes()
    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parent.name == "data" and Path(m.name).name in names}
            missing = [n for n in names if n not in members]
            if missing:
                raise BadSourceError(path, f"not an ILSVRC2012 devkit tarball: data/{', data/'.join(missing)} missing")
            return (tar.extractfile(members[names[0]]).read().decode(), tar.extractfile(members[names[1]]).read())
    except tarfile.TarError as e:
        raise BadSourceError(path, f"neither a devkit folder nor a readable tarball ({e})") from None


def _meta_wnids(meta: bytes, path: Path) -> dict[int, str]:
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise BadSourceError(path, f"meta.mat has no readable 'synsets' (ILSVRC2012_ID, WNID): {e}") from None


def _kaggle(path: Path, index: dict[str, int], rejects) -> Listed:
    listed: Listed = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise BadSourceError(path, f"expected Kaggle's header 'ImageId,PredictionString', found {header[:2]}")
        for lineno, row in enumerate(rows, 2):
            where = f"{path}:{lineno}"
            if not row:
                continue
            wnids = sorted(set(row[1].split()[::5])) if len(row) > 1 else []
            name = f"{row[0].strip()}.JPEG"
            if name in listed:
                raise BadSourceError(path, f"lines {listed[name][0].rsplit(':', 1)[1]} and {lineno} both name "
                                           f"{row[0].strip()!r}: keep one line per image")
            listed[name] = (where, None)
            if len(wnids) != 1:
                rejects.add(where, f"{row[0]!r} has {'no box' if not wnids else 'boxes of ' + ', '.join(wnids)}: "
                                   "one class per image is needed")
            elif wnids[0] not in index:
                rejects.add(where, f"{wnids[0]} is not an ImageNet-1k class")
            else:
                listed[name] = (where, index[wnids[0]])
    return listed
