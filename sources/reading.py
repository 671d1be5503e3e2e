"""Reading source images: index a source, then load each image as an RGB centre crop.

The source kinds share this code: an ImageNet-style class-folder tree (WordNet-id folders map to the standard
0-999 indices; any other folder names map to their sorted order, as torchvision's ImageFolder does), a flat folder
with its labels (``name index`` lines as the official DAmageNet ``val.txt``, the ILSVRC2012 devkit, Kaggle's CSV:
:mod:`sources.label_files`), images stored inside other files (Hugging Face parquet, webdataset tars:
:mod:`sources.containers`), and the embedded worlds (class-folder trees).

Bad input never stops a run by default: the sample is skipped and ``(file, reason)`` goes to a :class:`Rejects`
list that the stage writes next to its outputs and counts in its metrics. ``strict=True`` raises
:class:`BadSourceError` at the first bad sample instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import stat
import unicodedata
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from sources import BadSourceError  # defined import-light in sources/__init__.py; raised here
from sources.label_files import read_labels

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass
class Rejects:
    """Bad samples seen so far. ``strict`` turns the first one into an exception."""

    strict: bool = False
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: Path | str, reason: str) -> None:
        if self.strict:
            raise BadSourceError(path, reason)
        self.items.append((str(path), reason))

    def write(self, path: Path | str) -> None:
        """``file<TAB>reason`` lines; backslash, tab, newline and carriage return inside a field are escaped
        (``\\``, ``\t``, ``\n``, ``\r``) so a file name can never break the table."""
        Path(path).write_text("".join(f"{tsv_escape(p)}\t{tsv_escape(r)}\n" for p, r in self.items))

    def __len__(self) -> int:
        return len(self.items)


_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def tsv_escape(field: str) -> str:
    return "".join(_TSV_ESCAPES.get(c, c) for c in field)


def tsv_unescape(field: str) -> str:
    table = {v[1]: k for k, v in _TSV_ESCAPES.items()}
    out, chars = [], iter(field)
    for c in chars:
        out.append(table.get(next(chars, ""), "") if c == "\\" else c)
    return "".join(out)


@dataclass(frozen=True)
class SourceSample:
    key: str  # unique, no dots (webdataset splits keys at dots)
    path: Path  # the image file, or the parquet / tar file that holds the image (then ``member`` says where)
    label: int
    wnid: str  # WordNet id for ImageNet sources, the folder name otherwise
    member: Member | None = None

    @property
    def name(self) -> str:
        """The image's own file name (``ILSVRC2012_val_00000001.JPEG``), also when it is stored inside another file."""
        return self.member.name if self.member else self.path.name

    @property
    def where(self) -> str:
        """The image for a reader of messages: its path, or ``container[member]``."""
        return f"{self.path}[{self.member.name}]" if self.member else str(self.path)


@dataclass(frozen=True)
class Member:
    """An image stored inside another file: its file name, and its place there (a tar's byte offset and size, or a
    parquet file's row group and row)."""

    name: str
    at: tuple[int, int]


def sample_key(path: Path) -> str:
    return path.stem.replace(".", "_")


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in standard index order (shipped with timm, no download)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def _is_image(path: Path) -> bool:
    # no is_file(): a dangling link or unreadable entry must reach the reader and be rejected with its reason
    return path.suffix.lower() in IMAGE_SUFFIXES


def unique_keys(samples: list[SourceSample], root: Path) -> list[SourceSample]:
    """Give every sample a distinct key. Keys that clash, also only by case (a case-insensitive file system, or a
    consumer's, would merge them) or by Unicode form (NFC and NFD spellings of one name look the same), or across
    class folders, all get a suffix from their relative path."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[unicodedata.normalize("NFC", s.key).casefold()].append(i)  # café in NFC and NFD: one look
    out = list(samples)
    for members in groups.values():
        if len(members) > 1:
            for i in members:
                s = samples[i]
                rel = s.path.relative_to(root).as_posix() if s.path.is_relative_to(root) else str(s.path)
                rel += f"[{s.member.at}]" if s.member else ""  # one container holds many images
                out[i] = replace(s, key=f"{s.key}_{hashlib.sha256(rel.encode()).hexdigest()[:8]}")
    return out


def class_folder_source(root: Path | str, rejects: Rejects) -> tuple[list[SourceSample], list[str]]:
    """Index ``root/<class>/<image>``; returns samples (sorted by class then name) and the class names.

    Hidden folders (``.ipynb_checkpoints``, ``.git``) are ignored. Either every class folder is an ImageNet
    WordNet id (standard 0-999 indices) or none is (sorted order); a mix is an error naming the odd folders,
    because one stray folder would silently shift every label."""
    root = Path(root)
    if not root.is_dir():
        raise BadSourceError(root, "source folder does not exist")
    inside = root.resolve()
    folders = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            rejects.add(p, "hidden entry: not indexed")
        elif (problem := _entry_problem(p, inside)) is not None:
            rejects.add(p, problem)
        elif not p.is_dir():
            rejects.add(p, "not inside a class folder: not indexed")
        else:
            folders.append(p)
    if not folders:
        raise BadSourceError(root, "no class folders found")
    synsets = imagenet_synsets()
    wnids = [f.name for f in folders if f.name in set(synsets)]
    if wnids and len(wnids) < len(folders):
        odd = [f.name for f in folders if f.name not in set(synsets)]
        raise BadSourceError(root, f"{len(wnids)} WordNet-id class folders mixed with {len(odd)} other folder(s) "
                                   f"{odd[:5]}: remove or rename them (labels would shift)")
    if wnids:
        index = {wnid: i for i, wnid in enumerate(synsets)}
        class_names = synsets
    else:
        index = {f.name: i for i, f in enumerate(folders)}
        class_names = [f.name for f in folders]
    samples = []
    for folder in folders:
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            raise BadSourceError(folder, f"class folder cannot be read ({e.strerror or e})") from None
        images = [p for p in entries if _indexable(p, inside, rejects)]
        if not images:
            rejects.add(folder, "empty class folder: no image files")
        samples += [SourceSample(sample_key(p), p, index[folder.name], folder.name) for p in images]
    return unique_keys(_once_per_file(samples, rejects), root), class_names


def _once_per_file(samples: list[SourceSample], rejects: Rejects) -> list[SourceSample]:
    """One sample per file, however many paths reach it (a linked class folder, a link into another class): under
    one label the path without links is kept and the others rejected; a file reached under two labels is refused."""
    by_file: dict[tuple[int, int], list[SourceSample]] = defaultdict(list)
    for s in samples:
        try:
            st = s.path.stat()
        except OSError:  # unreadable or dangling: the reader rejects it with its reason
            by_file[(-1, id(s))].append(s)
            continue
        by_file[(st.st_dev, st.st_ino)].append(s)
    kept = set()
    for same in by_file.values():
        if len(same) > 1:
            same.sort(key=lambda s: s.path.absolute() != s.path.resolve())  # the path without links first (stable)
        if len({s.label for s in same}) > 1:
            for s in same:
                rejects.add(s.path, "the same file as " + ", ".join(str(o.path) for o in same if o is not s)
                            + f" under another class ({', '.join(sorted({o.wnid for o in same}))}): refused")
            continue
        kept.add(id(same[0]))
        for s in same[1:]:
            rejects.add(s.path, f"the same file as {same[0].path}: indexed once")
    return [s for s in samples if id(s) in kept]


def _entry_problem(path: Path, root: Path) -> str | None:
    """Why an entry that is neither hidden nor of a skipped type cannot be read: a link loop, a link out of
    ``root``, or something other than a regular file (a FIFO would block the reader forever)."""
    try:
        resolved = path.resolve(strict=False)
    except (RuntimeError, OSError):
        return "symbolic link loop: refused"
    if not (resolved == root or root in resolved.parents):
        return f"links to {resolved}, outside the source root: refused"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:  # a dangling link: the reader rejects it with its reason
        return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e}): refused"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not a regular file (a FIFO, socket or device): not read"
    return None


def _indexable(path: Path, root: Path, rejects: Rejects) -> bool:
    """An image file to index; anything else is recorded with the reason it is skipped."""
    if path.name.startswith("."):
        rejects.add(path, "hidden file: not indexed")
    elif path.is_dir():
        rejects.add(path, "folder inside a class folder: not indexed (one level of class folders)")
    elif not _is_image(path):
        rejects.add(path, f"file type {path.suffix or '(none)'!r} is not read (reads {', '.join(sorted(IMAGE_SUFFIXES))})")
    elif (problem := _entry_problem(path, root)) is not None:
        rejects.add(path, problem)
    else:
        return True
    return False


def label_file_source(
    folder: Path | str, label_file: Path | str, rejects: Rejects, num_classes: int = 1000, kind: str = "label_file"
) -> list[SourceSample]:
    """Index a flat folder from its labels: ``name index`` lines (official DAmageNet ``val.txt`` layout), or the
    devkit's or Kaggle's forms (``kind``; :mod:`sources.label_files`)."""
    folder, label_file = Path(folder), Path(label_file)
    synsets = imagenet_synsets() if num_classes == 1000 else None
    listed = read_labels(kind, label_file, synsets, rejects)
    samples, inside = [], folder.resolve()
    for name, (where, label) in listed.items():
        if label is None:  # refused by the reader, which said why
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:
            rejects.add(where, f"image name {name!r} points outside {folder}: refused")
            continue
        path = folder / name
        if (problem := _entry_problem(path, inside)) is not None:
            rejects.add(path, problem)
        elif not (0 <= label < num_classes):
            rejects.add(where, f"class index {label} out of range 0..{num_classes - 1} for {name}")
        elif not path.is_file():
            rejects.add(path, f"missing image named in {where}")
        else:
            samples.append(SourceSample(sample_key(path), path, label, synsets[label] if synsets else str(label)))
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.name not in listed and p.resolve() != label_file.resolve():
                rejects.add(p, f"not listed in {label_file}: not indexed")
    return unique_keys(_once_per_file(samples, rejects), folder)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white, 16-bit scaled, CMYK converted, float
    images scaled by their range (0..1, or already 0..255; anything else is refused)."""
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(arr).all() and lo >= 0 and hi <= 255):
            raise ValueError(f"float image with values {lo:g}..{hi:g}: neither 0..1 nor 0..255")
        scale = 255.0 if hi <= 1.0 else 1.0
        img = Image.fromarray(np.round(arr * scale).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.round(arr / peak * 255).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA", "RGBA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_crop(
    path: Path | str, size: int, crop_pct: float = 0.875, filter: str = "bicubic", min_side: int = 16,
    data: bytes | None = None,
) -> np.ndarray:
    """Load one image as uint8 ``size x size x 3``: resize the short side to ``floor(size / crop_pct)``
    (antialiased), then centre-crop ``size`` (timm's eval transform). ``data``: the image's bytes, read from
    another file (``path`` then only names it). Raises :class:`BadSourceError`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: treat both as the bomb they may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                img.load()  # decode now: truncated data fails here, not later
                img = _to_rgb(ImageOps.exif_transpose(img))  # the camera's orientation tag, as viewers show it
    except FileNotFoundError:
        raise BadSourceError(path, "file not found") from None
    except PermissionError:
        raise BadSourceError(path, "file is not readable (permission denied)") from None
    except IsADirectoryError:
        raise BadSourceError(path, "is a directory, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSourceError(path, f"decompression bomb refused ({e})") from None
    except UnidentifiedImageError:
        empty = (len(data) if data is not None else path.stat().st_size) == 0
        kind = "empty file (0 bytes)" if empty else "not an image Pillow can identify"
        raise BadSourceError(path, kind) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSourceError(path, f"cannot decode image ({e})") from None
    if min(img.size) < min_side:
        raise BadSourceError(path, f"image too small ({img.width}x{img.height}; need a side of at least {min_side})")
    if filter not in FILTERS:
        raise ValueError(f"unknown resize filter {filter!r}; choose from {sorted(FILTERS)}")
    scale = math.floor(size / crop_pct)
    w, h = img.size
    # same integer arithmetic as torchvision's Resize(int) and CenterCrop, so crops equal timm's eval transform
    new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    img = img.resize(new, FILTERS[filter])
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def load_images(
    samples: list[SourceSample], size: int, rejects: Rejects, crop_pct: float = 1.0, filter: str = "bicubic",
    min_side: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, list[SourceSample]]:
    """Load samples into uint8 NCHW images and int64 labels, skipping (and recording) bad files."""
    images, kept = [], []
    for s in tqdm(samples, desc="load images", unit="img", mininterval=2):
        try:
            images.append(load_crop(s.path, size, crop_pct, filter, min_side))
        except BadSourceError as e:
            rejects.add(e.path, e.reason)
            continue
        kept.append(s)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return x, torch.tensor([s.label for s in kept], dtype=torch.long), kept


def load_split(root: Path | str, size: int, strict: bool = False) -> tuple[torch.Tensor, torch.Tensor, Rejects]:
    """A class-folder split as uint8 NCHW images and labels (training stages); bad files are skipped and counted,
    or with ``strict`` raise naming the file."""
    rejects = Rejects(strict=strict)
    samples, _ = class_folder_source(root, rejects)
    images, labels, _ = load_images(samples, size, rejects, crop_pct=1.0)
    return images, labels, rejects


def load_image_folder(folder: Path | str, size: int, strict: bool = False) -> torch.Tensor:
    """Every image directly in ``folder`` (sorted by name, no labels) as uint8 NCHW: outlier and OOD sets."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadSourceError(folder, "image folder does not exist")
    rejects = Rejects(strict=strict)
    paths = sorted(p for p in folder.iterdir() if _is_image(p))
    if not paths:
        raise BadSourceError(folder, "no image files")
    samples = unique_keys([SourceSample(sample_key(p), p, -1, folder.name) for p in paths], folder)
    return load_images(samples, size, rejects, crop_pct=1.0)[0]


ILSVRC_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.")


def read_label_sets(path: Path | str, samples: list[SourceSample], num_classes: int) -> dict[str, list[int]]:
    """Sample key -> its set of acceptable classes, from a label-set file (the ImageNet-ReaL convention).

    Two layouts: timm's ``real.json``, a list with one list of indices per image in file-name order (for ILSVRC2012
    val file names, entry N-1 belongs to ``ILSVRC2012_val_<N>``, so a subset of val works too), or an object
    mapping a file name or sample key to its list. An image the file does not cover gets no set; an empty list is
    kept as one (both leave the image out of ReaL accuracy, as timm does). Raises :class:`BadSourceError`."""
    path = Path(path)
    try:
        sets = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadSourceError(path, "label-set file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSourceError(path, f"not a readable JSON label-set file ({e})") from None
    if isinstance(sets, list):
        numbered = [ILSVRC_VAL_NAME.match(s.name) for s in samples]
        if samples and all(numbered):
            where = {s.key: int(m.group(1)) - 1 for s, m in zip(samples, numbered)}
        elif len(sets) == len(samples):
            where = {s.key: i for i, s in enumerate(sorted(samples, key=lambda s: s.name))}
        else:
            raise BadSourceError(path, f"a list of {len(sets)} label sets for {len(samples)} indexed images: a list "
                                       "is read in file-name order and needs one entry per image (or ILSVRC2012 val "
                                       "file names); map file names to sets instead")
        found = {k: sets[i] for k, i in where.items() if i < len(sets)}
    elif isinstance(sets, dict):
        by_name = defaultdict(list)
        for s in samples:
            by_name[s.name].append(s)
        for name, same in by_name.items():  # a file name two images share says nothing about which one it means
            if len(same) > 1 and name in sets:
                raise BadSourceError(path, f"{name!r} names {len(same)} images ({', '.join(s.where for s in same[:3])}"
                                           "): key those label sets by sample key or by a unique name")
        found = {s.key: sets[n] for s in samples for n in (s.name, s.key) if n in sets}
    else:
        raise BadSourceError(path, f"expected a list or an object of label sets, not {type(sets).__name__}")
    for key, classes in found.items():
        if not (isinstance(classes, list) and all(type(c) is int and 0 <= c < num_classes for c in classes)):
            raise BadSourceError(path, f"label set of {key!r} is {classes!r}: expected a list of class indices in "
                                       f"0..{num_classes - 1}")
    return {k: sorted(set(v)) for k, v in found.items()}
