"""ImageNet val as it is distributed: the wnid tree, a flat folder with Caffe's val.txt, with the ILSVRC2012 devkit
(folder or tarball), with Kaggle's LOC_val_solution.csv, as the Hub's ILSVRC/imagenet-1k parquet files and as timm's
webdataset tars. The same photos written in every layout, with fakes in the real layouts (a meta.mat written with
scipy in the devkit's structure, whose class ids are not timm's order; parquet written with pyarrow in the hub cache
layout; tars written with webdataset's writer), give the same clean shards, pixel for pixel, label for label and
record for record (ReaL label sets included)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from imagenet_standins import (
    write_devkit,
    write_hub_parquet,
    write_ilsvrc_val,
    write_kaggle,
    write_wds,
)

from pipelines.config import Source
from pipelines.flows.prepare import prepare_flow
from shards.shardset import iter_shardset


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    labels = write_ilsvrc_val(root / "tree")
    flat = root / "flat"
    flat.mkdir()
    for wnid_dir in (root / "tree").iterdir():
        for f in wnid_dir.iterdir():
            shutil.copy(f, flat / f.name)
    extra = "ILSVRC2012_val_00000099"  # an image Kaggle gives boxes of two classes
    shutil.copy(next(flat.iterdir()), flat / f"{extra}.JPEG")
    (root / "labels").mkdir()
    (root / "labels" / "val.txt").write_text("".join(f"{n} {i}\n" for n, i in labels.items()))
    devkit = write_devkit(root / "labels", labels)
    with tarfile.open(root / "labels" / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(devkit, arcname=devkit.name)
    write_kaggle(root / "labels" / "LOC_val_solution.csv", labels, extra)
    stored = {n: ((flat / n).read_bytes(), i) for n, i in labels.items()}
    # the extra image: the test split's missing label (-1) in the parquet, a cls and json that disagree in the tar
    write_hub_parquet(root / "hub", {**stored, f"{extra}.JPEG": ((flat / f"{extra}.JPEG").read_bytes(), -1)})
    write_wds(root / "wds", stored)
    with wds.TarWriter(str(root / "wds" / "imagenet1k-validation-0002.tar")) as sink:
        sink.write({"__key__": extra, "jpg": (flat / f"{extra}.JPEG").read_bytes(), "cls": 1,
                    "json": {"filename": f"{extra}.JPEG", "label": 2}})
    # ReaL's label sets, one list per image in ILSVRC2012 numbering (an empty one included)
    real = [[labels[n], 999] if k % 2 else [] for k, n in enumerate(sorted(labels))]
    (root / "labels" / "real.json").write_text(json.dumps(real))
    return root, labels


def _prepare(data: Path, out: Path, **kw) -> dict:
    source = Source(data=str(data), num_classes=1000, size=64, crop_pct=0.875, shard_size=2, out=str(out),
                    label_sets=str(data / "labels" / "real.json"), **kw)
    return prepare_flow(source, metrics_path=str(out.parent / f"{out.name}.json"))


def _samples(folder: Path) -> dict[str, tuple]:
    return {s["key"]: (s["cls"], s["image"].tobytes(), s["json"]) for s in iter_shardset(folder)}


@pytest.fixture(scope="module")
def tree_samples(layouts, prefect_server, tmp_path_factory):
    root, labels = layouts
    out = tmp_path_factory.mktemp("tree") / "clean"
    assert _prepare(root, out, kind="class_folder", root=str(root / "tree"))["images"] == len(labels)
    return _samples(out)


@pytest.mark.parametrize("kind,folder,label_file", [
    ("label_file", "flat", "val.txt"), ("devkit", "flat", "ILSVRC2012_devkit_t12"),
    ("devkit", "flat", "ILSVRC2012_devkit_t12.tar.gz"), ("kaggle", "flat", "LOC_val_solution.csv"),
    ("hf_dataset", "hub", None),                                     # the hub cache holding the dataset's repo
    ("hf_dataset", "hub/datasets--ILSVRC--imagenet-1k", None),       # the repo folder itself
    ("hf_dataset", "hub/datasets--ILSVRC--imagenet-1k/snapshots/4603483700ee984ea9debe3ddbfdeae86f6489eb/data",
     None),                                                          # a folder of its parquet files
    ("wds", "wds", None)])
def test_every_layout_gives_the_wnid_trees_shards(layouts, tree_samples, kind, folder, label_file, tmp_path):
    root, labels = layouts
    made = _prepare(root, tmp_path / "clean", kind=kind, root=str(root / folder),
                    label_file=label_file and str(root / "labels" / label_file))
    expected = tree_samples
    # the same keys, labels, pixels and records: wnid, file name, the sha256 of the stored bytes, ReaL's label set
    assert _samples(tmp_path / "clean") == expected
    assert {k: v[0] for k, v in expected.items()} == {Path(n).stem: i for n, i in labels.items()}
    assert sum("label_set" in v[2] for v in expected.values()) == len(labels) and made["label_sets"] == 2
    rejects = (tmp_path / "clean" / "rejects.tsv").read_text()
    assert made["rejects"] == 1 and "ILSVRC2012_val_00000099" in rejects
    says = {"kaggle": "'ILSVRC2012_val_00000099' has boxes of n01443537, n01484850",  # boxes of two classes
            "hf_dataset": "label -1 is not a class index in 0..999 (the test split has no labels)",
            "wds": "cls says 1 but json says 2: refused"}
    assert says.get(kind, "not listed in") in rejects


@pytest.mark.parametrize("file,says", [
    ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
     "looks like the devkit's ILSVRC2012_validation_ground_truth.txt (one class id per image, ids of the devkit's "
     "meta.mat): set source.kind: devkit and source.label_file: the devkit folder or tarball"),
    ("LOC_val_solution.csv",
     "looks like Kaggle's LOC_val_solution.csv: set source.kind: kaggle (source.label_file: this file)")])
def test_a_label_file_in_another_format_is_named_with_the_kind_that_reads_it(layouts, file, says, tmp_path):
    """Before: `nothing selected from 0 indexed image(s)`, no reason, no format named."""
    root, _ = layouts
    params = yaml.safe_load(open("params.yaml"))
    params["source"].update(kind="label_file", data=str(root), root=str(root / "flat"),
                            label_file=str(root / "labels" / file), num_classes=1000, out=str(tmp_path / "clean"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run([str(Path(sys.executable).with_name("damagenet")), "--params", str(tmp_path / "p.yaml"),
                          "prepare"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert str(root / "labels" / file) in run.stderr and says in run.stderr and "lines are not 'name index'" in run.stderr
    assert not (tmp_path / "clean").exists()


def test_a_prepare_that_indexes_nothing_says_why_and_leaves_the_reasons(layouts, tmp_path, prefect_server):
    """A val.txt whose names miss the files (`.jpg` for `.JPEG`): before, `nothing selected from 0 indexed image(s)`
    and no rejects.tsv to read."""
    root, labels = layouts
    (root / "labels" / "wrong.txt").write_text("".join(f"{Path(n).stem}.jpg {i}\n" for n, i in labels.items()))
    params = yaml.safe_load(open("params.yaml"))
    params["source"].update(kind="label_file", data=str(root), root=str(root / "flat"), num_classes=1000,
                            label_file=str(root / "labels" / "wrong.txt"), out=str(tmp_path / "clean"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    _prepare(root, tmp_path / "clean", kind="label_file", root=str(root / "flat"),
             label_file=str(root / "labels" / "val.txt"))
    previous = {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    run = subprocess.run([str(Path(sys.executable).with_name("damagenet")), "--params", str(tmp_path / "p.yaml"),
                          "prepare"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    kept = tmp_path / "clean.rejects.tsv"
    assert "nothing selected from 0 indexed image(s)" in run.stderr and "missing image named in" in run.stderr
    assert f"every file in {kept}" in run.stderr and "the previous clean set is kept" in run.stderr
    assert len(kept.read_text().splitlines()) == len(labels) + 5  # 4 missing, 5 files not listed
    assert {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()} == previous


def test_damaged_parquet_and_tar_files_are_rejects_and_a_foreign_parquet_is_named(layouts, tmp_path):
    from sources import BadSourceError
    from sources.containers import container_source
    from sources.reading import Rejects

    root, labels = layouts
    data = root / "hub/datasets--ILSVRC--imagenet-1k/snapshots/4603483700ee984ea9debe3ddbfdeae86f6489eb/data"
    folder = tmp_path / "parquet"
    folder.mkdir()
    shutil.copy(data / "validation-00000-of-00002.parquet", folder)
    (folder / "validation-00001-of-00002.parquet").write_bytes(b"PAR1 cut short")  # an interrupted copy
    rejects = Rejects()
    assert len(container_source("hf_dataset", folder, rejects)) == 3
    assert [r for _, r in rejects.items][0].startswith("not a readable parquet file (")
    tars = tmp_path / "tars"
    shutil.copytree(root / "wds", tars)
    (tars / "imagenet1k-validation-0009.tar").write_bytes(b"not a tar")
    with wds.TarWriter(str(tars / "imagenet1k-validation-0010.tar")) as sink:
        sink.write({"__key__": "ILSVRC2012_val_00000077", "cls": 3})  # a label with no image
    rejects = Rejects()
    assert len(container_source("wds", tars, rejects)) == len(labels)
    reasons = sorted(r for _, r in rejects.items)
    assert reasons[0].startswith("cls says 1 but json says 2") and reasons[1].startswith("no image member")
    assert reasons[2].startswith("not a readable tar file (")
    pq.write_table(pa.table({"img": [b"x"], "target": [1]}), folder / "validation-00000-of-00002.parquet")
    with pytest.raises(BadSourceError, match="has no image or label column .*not the ILSVRC/imagenet-1k layout"):
        container_source("hf_dataset", folder, Rejects())
