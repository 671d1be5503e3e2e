"""Stand-ins in the real layouts for the ImageNet profile's rehearsal: an ILSVRC2012 val tree (1000 WordNet-id class
folders, a few real photos in their true classes, the quirks real downloads have), the same images as the Hub's
parquet dataset and as timm's webdataset tars, and a local Hugging Face hub cache holding random-weight timm models
exactly as ``hf download`` lays them out."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import timm
import torch
import webdataset as wds
from PIL import Image

from sources.real_world import PHOTOS

SYNSETS = list(timm.data.ImageNetInfo().label_names())

# the ImageNet profile's nine models, stood in for by tiny timm networks with hub weights (test_resnet is ResNet-like,
# so SGLRP can explain it: it stands in for the VGG19 surrogate); DenseNet-121 (8 M parameters) is itself, so the
# report's join with the published table has a row to show
STAND_INS = {"vgg19": "test_resnet.r160_in1k", "vgg16": "test_efficientnet.r160_in1k",
             "resnet50": "test_byobnet.r160_in1k", "densenet121": "densenet121.tv_in1k",
             "inception_v3": "test_convnext2.r160_in1k", "convnext_tiny": "test_convnext.r160_in1k",
             "vit_base_patch16_224": "test_vit.r160_in1k", "inception_v3_adv": "test_vit2.r160_in1k",
             "inception_resnet_v2_ens_adv": "test_nfnet.r160_in1k"}


def write_ilsvrc_val(root: Path) -> dict[str, int]:
    """``root/<wnid>/ILSVRC2012_val_000000NN.JPEG`` for all 1000 classes (most empty): first a greyscale PNG under a
    .JPEG name and a CMYK JPEG (the quirks of the real download), then two plain photos; returns file name -> true
    class index, in that order."""
    synsets = timm.data.ImageNetInfo().label_names()
    for wnid in synsets:
        (root / wnid).mkdir(parents=True, exist_ok=True)
    photos = {p.name: p for p in PHOTOS}
    labels = {}
    # in class order (how "first" selects): tabby 281, missile 657, tripod 872, espresso 967
    for i, (name, mode, fmt) in enumerate([("chelsea", "L", "PNG"),      # a greyscale PNG under a .JPEG name
                                           ("rocket", "CMYK", "JPEG"),   # CMYK JPEG (ImageNet has 22 of them)
                                           ("camera", "RGB", "JPEG"),
                                           ("coffee", "RGB", "JPEG")], 1):
        photo = photos[name]
        file = f"ILSVRC2012_val_{i:08d}.JPEG"
        with Image.open(photo.file()) as img:
            img.convert(mode).save(root / photo.wnid / file, format=fmt)
        labels[file] = photo.index
    return labels


def write_hub_model(cache: Path, arch: str, seed: int) -> str:
    """A random-weight ``arch`` (timm pretrained tag) in the hub cache layout; ``refs/main`` is moved to it.
    Returns its revision."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    repo = cache / f"models--timm--{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        timm.models.save_for_hf(model, tmp, safe_serialization=True)
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.name in ("config.json", "model.safetensors")}
    revision = hashlib.sha1(json.dumps(sorted(hashlib.sha256(b).hexdigest() for b in files.values())).encode()
                            ).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return revision


def write_hub_parquet(cache: Path, images: dict[str, tuple[bytes, int]]) -> None:
    """``cache/datasets--ILSVRC--imagenet-1k`` as huggingface_hub leaves it: ``refs/main`` naming a snapshot whose
    ``data/validation-*.parquet`` are links into ``blobs/``; an ``image`` struct of ``{bytes, path}`` and a ``label``,
    two rows per row group, the images split over two files."""
    repo, rev = cache / "datasets--ILSVRC--imagenet-1k", "4603483700ee984ea9debe3ddbfdeae86f6489eb"
    for folder in (repo / "blobs", repo / "snapshots" / rev / "data", repo / "refs"):
        folder.mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    names = sorted(images)
    for part, chunk in enumerate([names[:3], names[3:]]):
        table = pa.table({"image": [{"bytes": images[n][0], "path": n} for n in chunk],
                          "label": pa.array([images[n][1] for n in chunk], pa.int64())})
        written = repo / "blobs" / "incomplete"
        pq.write_table(table, written, row_group_size=2)
        blob = written.rename(repo / "blobs" / hashlib.sha256(written.read_bytes()).hexdigest())
        link = repo / "snapshots" / rev / "data" / f"validation-{part:05d}-of-00002.parquet"
        link.symlink_to(Path("../../..") / "blobs" / blob.name)


def write_wds(folder: Path, images: dict[str, tuple[bytes, int]]) -> None:
    """timm/imagenet-1k-wds's layout: ``imagenet1k-validation-NNNN.tar`` with ``<key>.jpg`` (the JPEG's bytes),
    ``<key>.cls`` and ``<key>.json`` (``filename``, ``label``), written by webdataset, two tars."""
    folder.mkdir()
    names = sorted(images)
    for part, chunk in enumerate([names[:2], names[2:]]):
        with wds.TarWriter(str(folder / f"imagenet1k-validation-{part:04d}.tar")) as sink:
            for n in chunk:
                data, label = images[n]
                sink.write({"__key__": Path(n).stem, "jpg": data, "cls": label,
                            "json": {"filename": n, "label": label}})


def _devkit_ids() -> dict[str, int]:
    """ILSVRC2012_ID per WordNet id: as in the real devkit, not in sorted-wnid order (here: reversed)."""
    return {wnid: 1000 - i for i, wnid in enumerate(SYNSETS)}


def write_devkit(root: Path, labels: dict[str, int]) -> Path:
    """``root/ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}``; meta.mat's ``synsets``
    is a struct array with the devkit's fields, the 1000 leaf classes then two parent synsets (ids 1001, 1002)."""
    from scipy.io import savemat

    ids = _devkit_ids()
    rows = [(ids[w], w, f"class {w}", "", 0, [], 0, 1300) for w in SYNSETS]
    rows += [(1001, "n00001740", "entity", "", 22, [1002], 1, 0), (1002, "n00002684", "object", "", 21, [], 2, 0)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = np.array(rows, dtype=dtype)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    # one id per image, in file-name order (the images are numbered 1..N)
    truth = [ids[SYNSETS[labels[name]]] for name in sorted(labels)]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in truth))
    return data.parent


def write_kaggle(path: Path, labels: dict[str, int], extra: str) -> None:
    """LOC_val_solution.csv: one row per image, boxes ``wnid x1 y1 x2 y2`` (two boxes of one class on one image),
    and ``extra`` with boxes of two classes."""
    rows = ["ImageId,PredictionString"]
    for i, (name, label) in enumerate(sorted(labels.items())):
        boxes = f"{SYNSETS[label]} 10 20 200 220 " * (2 if i == 0 else 1)
        rows.append(f"{Path(name).stem},{boxes}")
    rows.append(f"{extra},{SYNSETS[1]} 1 1 5 5 {SYNSETS[2]} 3 3 9 9 ")
    path.write_text("\n".join(rows) + "\n")
