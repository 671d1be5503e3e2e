"""Shard sets: deterministic webdataset tar shards plus everything a consumer needs beside them.

Layout of one set (``data/shards/<name>/``)::

    <name>-000000.tar ...   samples ``<key>.png`` (uint8 RGB), ``<key>.cls`` (class index), ``<key>.json`` (provenance)
    shardindex.json         wids shard index (url, nsamples, filesize per shard)
    _info.json              timm's wds reader info (split ``validation``)
    manifest.jsonl          one line per sample: key, shard, label
    SHA256SUMS              ``sha256sum -c`` format, every shard and index file
    README.md               the dataset card (written by the stage that made the set)

Every tar is byte-identical for the same samples: fixed sample order, ``mtime=0``, fixed PNG settings, JSON with
sorted keys. A shard is written under a temporary name of its own (``<name>.<pid>-<random>.tmp``) and renamed when
complete, so a crash leaves no half shard and a rerun only writes the shards that are missing. Never pickle in
published shards; readers here decode only the fields the format defines and refuse any other.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from common.files import sha256_file

INDEX_FILES = ("shardindex.json", "_info.json", "manifest.jsonl")
FIELDS = {"png", "cls", "json"}  # the only members a sample may have


def shard_name(set_name: str, index: int) -> str:
    return f"{set_name}-{index:06d}.tar"


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode != "RGB":
            raise ValueError(f"PNG mode {img.mode}, expected RGB")
        return np.asarray(img)


class ShardWriter:
    """Write one shard sample by sample under ``<name>.tmp``; renamed to ``<name>`` only when closed cleanly.

    A crash (even SIGKILL) leaves at most a ``.tmp`` file, never a half shard under the real name.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: two writers of one shard never share (or delete) each other's file
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self.file = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.file, mtime=0, encoder=False)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """``sample``: ``{"key", "image" (uint8 HxWx3), "cls", "json"}``."""
        if "." in sample["key"]:
            raise ValueError(f"{self.path}: key {sample['key']!r} contains a dot (webdataset would split the sample)")
        self.tar.write({
            "__key__": sample["key"],
            "png": encode_png(sample["image"]),
            "cls": str(int(sample["cls"])).encode(),
            "json": json.dumps(sample["json"], sort_keys=True).encode(),
        })
        self.count += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tar.close()  # the tar's end blocks; the file object stays ours
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exc_type is not None or self.count == 0:
            self.tmp.unlink()
            if exc_type is None:
                raise ValueError(f"{self.path}: refusing to write an empty shard (readers reject empty tars)")
            return
        os.replace(self.tmp, self.path)


def write_shard(path: Path | str, samples: list[dict[str, Any]]) -> None:
    """Write a list of samples as one shard, atomically."""
    with ShardWriter(path) as sink:
        for s in samples:
            sink.write(s)


def read_shard(path: Path | str) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order: ``{"key", "image", "cls", "json"}``. Only ``png``, ``cls`` and ``json`` are
    decoded (never a pickle); a sample with any other member is refused, naming it."""
    for key, fields in tar_samples(path):
        if set(fields) != FIELDS:
            raise ValueError(f"{path}: sample {key!r} has members {sorted(fields)}; a shard sample holds exactly "
                             f"{sorted(FIELDS)} (other members, pickles above all, are never decoded)")
        yield {"key": key, "image": decode_png(fields["png"]), "cls": int(fields["cls"]),
               "json": json.loads(fields["json"])}


MAX_MEMBER_BYTES = 256 << 20  # no member of a shard is larger (a 4096 x 4096 RGB PNG stays under 64 MiB)


def tar_samples(path: Path | str, max_member: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: raw bytes})`` in tar order, with the standard library (no decoding, no webdataset).

    Raises ``ValueError`` naming the member for anything but a regular file, for a member that repeats one of the
    current sample (two adjacent samples with the same key), and for a member larger than ``max_member`` bytes."""
    current, fields = None, {}
    with tarfile.open(path) as tar:
        for member in _checked_members(tar, path, max_member):
            key, _, ext = member.name.partition(".")
            if key != current and current is not None:
                yield current, fields
                fields = {}
            if ext in fields:
                raise ValueError(f"{path}: member {member.name!r} repeats (duplicate key {key!r})")
            current = key
            fields[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, fields


def _checked_members(tar: tarfile.TarFile, path: Path | str, max_member: int) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if not member.isfile():
            raise ValueError(f"{path}: member {member.name!r} is not a regular file")
        if member.size > max_member:  # refused before reading: a header may declare any size
            raise ValueError(f"{path}: member {member.name!r} declares {member.size} bytes, more than a sample "
                             f"of this set can hold ({max_member})")
        yield member


def check_members(path: Path | str, max_member: int = MAX_MEMBER_BYTES) -> None:
    """Every member's header checked as :func:`tar_samples` checks it (a regular file, a bounded size), without
    reading any data: before another reader (webdataset) loads whole members into memory."""
    try:
        with tarfile.open(path) as tar:
            for _ in _checked_members(tar, path, max_member):
                pass
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar ({' '.join(str(e).split())})") from None


def shard_records(path: Path | str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(key, cls, json)`` of each sample, without decoding its image (for indexes and metrics)."""
    for key, fields in tar_samples(path):
        yield key, int(fields["cls"]), json.loads(fields["json"])


def class_names(root: Path | str) -> dict[int, str]:
    """Class index -> readable name for the set in ``root`` (see :func:`names_of`)."""
    return names_of([meta for p in shard_paths(root) for _, _, meta in shard_records(p)])


def names_of(records: list[dict[str, Any]]) -> dict[int, str]:
    """Class index -> readable name from samples' records: ImageNet descriptions when they carry WordNet ids, else
    the source's class folder names (the ``wnid`` field)."""
    names = {r["label"]: r.get("wnid", str(r["label"])) for r in records}
    if names and all(re.fullmatch(r"n\d{8}", w) for w in names.values()):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return {i: info.index_to_description(i).split(",")[0] for i in range(1000)}
    return dict(sorted(names.items()))


def shard_paths(root: Path | str) -> list[Path]:
    return sorted(Path(root).glob("*.tar"))


def iter_shardset(root: Path | str) -> Iterator[dict[str, Any]]:
    for p in shard_paths(root):
        yield from read_shard(p)


def index_files(root: Path | str, set_name: str, shards: list[Path]) -> dict[str, str]:
    """The contents of ``shardindex.json``, ``_info.json`` and ``manifest.jsonl`` for ``shards``, from the shards
    themselves (what ``write_index`` writes and ``verify`` recomputes)."""
    counts, manifest = [], []
    for p in shards:
        n = 0
        for key, cls, _ in shard_records(p):
            manifest.append({"key": key, "shard": p.name, "label": cls})
            n += 1
        counts.append(n)
    shardindex = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": set_name,
        "shardlist": [{"url": p.name, "nsamples": n, "filesize": p.stat().st_size} for p, n in zip(shards, counts)],
    }
    info = {
        "name": set_name,
        "splits": {"validation": {"name": "validation", "num_samples": sum(counts),
                                  "filenames": [p.name for p in shards], "shard_lengths": counts}},
    }
    return {"shardindex.json": json.dumps(shardindex, indent=2) + "\n", "_info.json": json.dumps(info, indent=2) + "\n",
            "manifest.jsonl": "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest)}


def write_sums(root: Path | str, sums: dict[str, str]) -> None:
    """``SHA256SUMS`` (``sha256sum -c`` format) from ``{file name: sha256}`` in that order, written whole and
    atomically: a kill leaves the old file or the new one, never a part (a resume trusts what it lists)."""
    tmp = Path(root) / f".SHA256SUMS.{os.getpid()}.tmp"
    tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    os.replace(tmp, Path(root) / "SHA256SUMS")


CARD_FILES = ("README.md", "rejects.tsv")  # listed in SHA256SUMS when the stage wrote them


def write_index(root: Path | str, set_name: str, shards: list[Path] | None = None) -> dict[str, Any]:
    """Write shardindex.json, _info.json, manifest.jsonl and SHA256SUMS for ``shards`` (default: every shard in
    ``root``); SHA256SUMS lists every file of the set once. Call it only while no other process writes to
    ``root``: leftover temporary files are removed."""
    root = Path(root)
    for stale in [*root.glob("*.tar.*.tmp"), *root.glob(".SHA256SUMS.*.tmp")]:  # left by an interrupted run
        stale.unlink()
    shards = sorted(shards) if shards is not None else shard_paths(root)
    contents = index_files(root, set_name, shards)
    for name, text in contents.items():
        (root / name).write_text(text)
    files = [p.name for p in shards] + list(INDEX_FILES) + [f for f in CARD_FILES if (root / f).exists()]
    write_sums(root, {f: sha256_file(root / f) for f in files})
    info = json.loads(contents["_info.json"])["splits"]["validation"]
    return {"shards": len(shards), "samples": info["num_samples"]}
