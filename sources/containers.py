"""Images stored inside other files: ImageNet as Hugging Face and timm distribute it.

- ``hf_dataset``: the parquet files of the Hub dataset ``ILSVRC/imagenet-1k`` (an ``image`` column of
  ``{bytes, path}`` and a ``label`` column in sorted-wnid order, timm's order), read from the local hub cache
  (``datasets--ILSVRC--imagenet-1k``: the snapshot ``refs/main`` names, ``data/validation-*.parquet``) or from a
  folder of parquet files.
- ``wds``: webdataset tars as timm's copy ``timm/imagenet-1k-wds`` (``<key>.jpg``, ``<key>.cls`` with the class
  index, ``<key>.json`` whose ``filename`` is the original file name), from a folder of ``.tar`` files or that
  repo in the hub cache (``*validation*.tar`` of its snapshot).

Indexing reads only labels and names; each image's bytes are read when it is cropped (:func:`member_bytes`), as
stored: a wnid tree of the same photos gives the same clean shards. Bad rows and members are rejects with reasons.
"""

from __future__ import annotations

import functools
import json
import tarfile
from pathlib import Path

from sources import BadSourceError
from sources.reading import Member, Rejects, SourceSample, imagenet_synsets, sample_key, unique_keys

HUB_REPOS = {"hf_dataset": "datasets--ILSVRC--imagenet-1k", "wds": "datasets--timm--imagenet-1k-wds"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset's image member names


def hub_snapshot(root: Path, repo: str) -> Path | None:
    """The snapshot folder ``refs/main`` names when ``root`` is that repo in a hub cache, or a hub cache holding
    it; None for any other folder."""
    for folder in (root, root / repo):
        ref = folder / "refs" / "main"
        if ref.is_file():
            snapshot = folder / "snapshots" / ref.read_text().strip()
            if not snapshot.is_dir():
                raise BadSourceError(ref, f"names snapshot {snapshot.name}, which is not in the cache "
                                          "(an interrupted download?)")
            return snapshot
    return None


def _files(root: Path, kind: str) -> list[Path]:
    if not root.is_dir():
        raise BadSourceError(root, "source folder does not exist")
    snapshot = hub_snapshot(root, HUB_REPOS[kind])
    if kind == "hf_dataset":
        files = sorted(snapshot.glob("data/validation-*.parquet")) if snapshot else sorted(root.glob("*.parquet"))
    else:
        files = sorted(snapshot.rglob("*validation*.tar")) if snapshot else sorted(root.glob("*.tar"))
    if not files:
        where = f"snapshot {snapshot.name}" if snapshot else "the folder"
        wanted = "data/validation-*.parquet" if kind == "hf_dataset" else ("*validation*.tar" if snapshot else "*.tar")
        raise BadSourceError(root, f"no {wanted} files in {where} (source.kind {kind})")
    return files


def _sample(path: Path, name: str, at: tuple[int, int], label, num_classes: int, synsets, rejects: Rejects):
    where = f"{path}[{name}]"
    if type(label) is not int or not 0 <= label < num_classes:
        rejects.add(where, f"label {label!r} is not a class index in 0..{num_classes - 1}"
                    + (" (the test split has no labels)" if label == -1 else ""))
        return None
    return SourceSample(sample_key(Path(name)), path, label, synsets[label] if synsets else str(label),
                        Member(name, at))


def container_source(kind: str, root: Path | str, rejects: Rejects, num_classes: int = 1000) -> list[SourceSample]:
    """Index the parquet files (``kind`` hf_dataset) or webdataset tars (wds) under ``root``: names and labels only."""
    root = Path(root)
    synsets = imagenet_synsets() if num_classes == 1000 else None
    entries, samples = (_parquet_entries if kind == "hf_dataset" else _tar_entries), []
    for path in _files(root, kind):
        try:
            for name, at, label in entries(path, rejects):
                if (s := _sample(path, name, at, label, num_classes, synsets, rejects)) is not None:
                    samples.append(s)
        except BadSourceError:
            raise
        except (OSError, ValueError, tarfile.TarError) as e:  # pyarrow's ArrowInvalid is a ValueError
            rejects.add(path, f"not a readable {'parquet' if kind == 'hf_dataset' else 'tar'} file ({e})")
    return unique_keys(samples, root)


def _parquet_entries(path: Path, rejects: Rejects):
    """(image file name, (row group, row), label) per row of an ``image`` / ``label`` parquet file."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    missing = {"image", "label"} - set(parquet.schema_arrow.names)
    if missing:
        raise BadSourceError(path, f"has no {' or '.join(sorted(missing))} column (columns: "
                                   f"{', '.join(parquet.schema_arrow.names)}): not the ILSVRC/imagenet-1k layout")
    for group in range(parquet.num_row_groups):
        # the image paths and labels only; the bytes are read row group by row group when cropped
        table = parquet.read_row_group(group, columns=["image", "label"])
        names = table.column("image").combine_chunks().field("path").to_pylist()
        for row, (name, label) in enumerate(zip(names, table.column("label").to_pylist())):
            yield (Path(name).name if name else f"{path.stem}-{group}-{row}.jpg"), (group, row), label


def _tar_entries(path: Path, rejects: Rejects):
    """(image file name, (byte offset, size), label) per key of a webdataset tar with an image and a ``cls`` (or a
    ``json`` with ``label``); ``json``'s ``filename`` names the image, as in timm's copy."""
    for key, parts in _tar_members(path).items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            rejects.add(f"{path}[{key}]", f"no image member ({', '.join(IMAGE_EXTENSIONS)}) for this key")
            continue
        info, cls = parts.get("json"), parts.get("cls")
        try:
            meta = json.loads(_read(path, info.offset_data, info.size)) if info else {}
            label = int(_read(path, cls.offset_data, cls.size)) if cls else meta.get("label")
        except ValueError as e:  # a json or cls member that does not parse
            rejects.add(f"{path}[{key}]", f"unreadable cls or json member ({e})")
            continue
        name = Path(meta.get("filename") or Path(image.name).name).name
        if cls and "label" in meta and meta["label"] != label:
            rejects.add(f"{path}[{name}]", f"cls says {label} but json says {meta['label']}: refused")
            continue
        yield name, (image.offset_data, image.size), label


def _tar_members(path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Key -> extension -> member, split as webdataset splits names: at the first dot of the base name."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path, "r:") as tar:  # plain tars only: a member is read at its byte offset
        for info in tar:
            if info.isfile():
                folder, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                members.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = info
    return members


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@functools.lru_cache(maxsize=4)  # samples come in key order, which is the files' order: one group read once
def _row_group_images(path: Path, group: int) -> list[bytes | None]:
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).read_row_group(group, columns=["image"]).column("image").combine_chunks()
    return column.field("bytes").to_pylist()


def member_bytes(sample: SourceSample) -> bytes:
    """The stored bytes of an image inside a parquet or tar file. Raises :class:`BadSourceError`."""
    first, second = sample.member.at
    try:
        data = _row_group_images(sample.path, first)[second] if sample.path.suffix == ".parquet" else \
            _read(sample.path, first, second)
    except (OSError, ValueError) as e:
        raise BadSourceError(sample.where, f"cannot be read ({e})") from None
    if not data:
        raise BadSourceError(sample.where, "no image bytes stored")
    return data
