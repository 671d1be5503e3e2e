"""The ImageNet profile rehearsed the way a researcher meets it: an ILSVRC2012 val tree and a local Hugging Face
cache in their real layouts (stand-ins: random weights, a few real photos), run through the README's command."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from imagenet_standins import (
    STAND_INS,
    write_devkit,
    write_hub_model,
    write_hub_parquet,
    write_ilsvrc_val,
    write_kaggle,
    write_wds,
)

from shards.shardset import iter_shardset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    for seed, arch in enumerate(STAND_INS.values()):
        write_hub_model(cache, arch, seed)
    return cache


def _overrides() -> list[str]:
    """Only what the README says to set (source.root, through make's IMAGENET_VAL, and a subset: the two quirky
    files) plus each model's architecture: tiny stand-ins with the profile's names."""
    models = yaml.safe_load((REPO / "profiles/imagenet.yaml").read_text())["zoo"]["models"]
    return ["source.select.mode=first", "source.select.n=2",
            *(f"zoo.models.{i}.arch={STAND_INS[m['name']]}" for i, m in enumerate(models))]


@pytest.mark.slow
def test_imagenet_profile_runs_as_the_readme_says(tmp_path, hub_cache):
    val = tmp_path / "ILSVRC2012" / "val"
    labels = write_ilsvrc_val(val)
    workspace = tmp_path / "ws"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # its own server, as the make target starts one
    dry = subprocess.run([str(REPO / "scripts/run-profile"), "--dry", str(REPO / "profiles/imagenet.yaml"),
                          str(tmp_path / "plan"), f"source.root={val}", f"source.data={val}"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = [line for line in dry.stdout.splitlines() if line.startswith("> ")]
    assert commands[0] == "> damagenet hub-weights" and commands[-1] == "> damagenet report"
    assert "> damagenet generate --attack aoa" in commands and len(commands) == 11
    assert not (tmp_path / "plan" / "dvc.lock").exists() and not (tmp_path / "plan" / "data/shards").exists()
    # the official ReaL file's layout: one list per val image in ILSVRC2012 numbering, beside val (as the profile says)
    real = [[281, 282, 285], [657, 744], [], [967, 968]]
    (val.parent / "real.json").write_text(json.dumps(real))
    run = subprocess.run(["make", "-s", "imagenet", f"IMAGENET_VAL={val}", f"WORKSPACE={workspace}",
                          f"SET={' '.join(_overrides())} source.data={val.parent} "
                          f"source.label_sets={val.parent / 'real.json'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    # clean crops in their true (timm) classes, whatever the file's real format
    clean = {s["json"]["source_file"]: s for s in iter_shardset(workspace / "data/shards/clean")}
    assert {name: s["cls"] for name, s in clean.items()} == dict(list(labels.items())[:2])  # grey PNG, CMYK
    assert all(s["image"].shape == (224, 224, 3) for s in clean.values())
    assert {name: s["json"]["label_set"] for name, s in clean.items()} == {
        "ILSVRC2012_val_00000001.JPEG": real[0], "ILSVRC2012_val_00000002.JPEG": real[1]}
    attacks = yaml.safe_load((REPO / "profiles/imagenet.yaml").read_text())["attacks"]
    for attack in attacks:
        samples = list(iter_shardset(workspace / "data/shards" / attack))
        assert [s["cls"] for s in samples] == [s["cls"] for s in clean.values()]
        assert max(s["json"]["rmsd"] for s in samples) <= 7.0, attack

    # weight identity: each hub model resolved to its snapshot and the file's sha256, no machine paths
    hub = json.loads((workspace / "data/hub_weights.json").read_text())
    zoo = json.loads((workspace / "metrics/zoo.json").read_text())
    assert set(hub) == set(zoo) == set(STAND_INS)
    for name, arch in STAND_INS.items():
        revision = (hub_cache / f"models--timm--{arch}" / "refs" / "main").read_text()
        assert hub[name]["revision"] == revision and zoo[name]["sha256"] == hub[name]["sha256"]
        assert not Path(hub[name]["file"]).is_absolute() and str(tmp_path) not in json.dumps(zoo)
    models = {m["name"]: m for m in json.loads((workspace / "data/zoo/models.json").read_text())}
    assert models["vgg19"]["revision"] == hub["vgg19"]["revision"]

    # results CSVs for every set and model; the report joins the published table and flags the random weights
    for s in ["clean", *attacks]:
        with open(workspace / f"data/eval/results/results-{s}.csv") as f:
            rows = list(csv.DictReader(f))
        assert {r["model"] for r in rows} == set(STAND_INS) and {r["architecture"] for r in rows} == set(
            STAND_INS.values())
        with open(workspace / f"data/eval/results/results-{s}-real.csv") as f:  # both images have a label set
            assert {r["model"] for r in csv.DictReader(f)} == set(STAND_INS)
    report = (workspace / "reports/report.md").read_text()
    assert "| DenseNet121 | 26.85 |" in report and "densenet121 (timm `densenet121.tv_in1k`; transfer victim)" in report
    assert report.count("near chance") >= 1 and "above the published 26.85%" in report
    # the checkout's own outputs were not touched
    assert not (REPO / "runs").exists() or workspace.parent != REPO / "runs"
    shutil.rmtree(workspace / "data/shards")  # large enough to matter across many test runs


def test_a_moved_hub_snapshot_is_new_weights_everywhere_and_only_for_that_model(tmp_path, monkeypatch,
                                                                               prefect_server):
    """A weight update moves refs/main: the hub record, the zoo's specs, the evaluation cache key and what loads
    follow the file's bytes; the other model keeps its record and its cached results."""
    from model_zoo.zoo import build_model, weights_hash
    from pipelines.config import Zoo
    from pipelines.flows.evaluate import evaluate_flow
    from pipelines.flows.zoo import hub_weights_flow, zoo_flow
    from pipelines.stages import read_models_file
    from shards.shardset import shard_name, write_index, write_shard

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    old = {arch: write_hub_model(cache, arch, seed) for seed, arch in enumerate(["test_resnet.r160_in1k",
                                                                                 "test_vit.r160_in1k"])}
    zoo = Zoo(out=str(tmp_path / "zoo"), data="weights", img_size=160,
              models=[{"name": "a", "arch": "test_resnet.r160_in1k", "weights": "hf-hub", "data": {}},
                      {"name": "b", "arch": "test_vit.r160_in1k", "weights": "hf-hub", "data": {}}])
    images = torch.randint(0, 256, (4, 160, 160, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean = tmp_path / "clean"
    write_shard(clean / shard_name("clean", 0), [{"key": f"k{i}", "image": images[i].numpy(), "cls": i, "json": {}}
                                                 for i in range(4)])
    write_index(clean, "clean")

    def run(tag):
        hub = hub_weights_flow(zoo, str(tmp_path / f"hub-{tag}.json"))
        zoo_flow(zoo, metrics_path=str(tmp_path / f"zoo-{tag}.json"), hub=hub)
        specs = read_models_file(tmp_path / "zoo" / "models.json")
        result = evaluate_flow(specs, {"clean": str(clean)}, str(tmp_path / "eval"),
                               metrics_path=str(tmp_path / f"eval-{tag}.json"))
        return hub, {s.name: s for s in specs}, {r["name"]: r for r in result["records"]}

    hub1, specs1, eval1 = run("before")
    assert not any(r["results"]["clean"]["cached"] for r in eval1.values())
    new = write_hub_model(cache, "test_vit.r160_in1k", seed=7)  # the update: refs/main now names another snapshot
    hub2, specs2, eval2 = run("after")
    assert hub2["a"] == hub1["a"] and hub2["b"]["revision"] == new != old["test_vit.r160_in1k"]
    assert hub2["b"]["sha256"] != hub1["b"]["sha256"] and specs2["b"].sha256 == hub2["b"]["sha256"]
    assert eval2["a"]["results"]["clean"]["cached"] and not eval2["b"]["results"]["clean"]["cached"]
    assert weights_hash(specs2["a"]) == weights_hash(specs1["a"]) != weights_hash(specs1["b"]) != weights_hash(
        specs2["b"])
    # a spec pins its snapshot: the old record still loads the old weights, not what refs/main names now
    old_model, new_model = build_model(specs1["b"]), build_model(specs2["b"])
    assert not torch.equal(old_model.model.head.weight, new_model.model.head.weight)
    assert torch.equal(build_model(specs1["b"]).model.head.weight, old_model.model.head.weight)


def test_sanity_warnings_flag_near_chance_and_far_from_published_only():
    from evaluators.published import sanity_warnings

    errors = {"random": {"clean": 99.9}, "off": {"clean": 40.85}, "good": {"clean": 27.0}, "mine": {"clean": 95.0}}
    archs = {"random": "vgg16.tv_in1k", "off": "densenet121.tv_in1k", "good": "densenet121.tv_in1k",
             "mine": "resnet10t"}
    warned = sanity_warnings(errors, archs, 1000, imagenet=True)
    assert [w.split(":")[0] for w in warned] == ["random", "random", "off", "mine"]
    assert "14.0 points above the published 26.85%" in warned[2]
    assert sanity_warnings(errors, archs, 10, imagenet=False) == []  # 95% of 10 classes is not chance's 90%


@pytest.mark.parametrize("stage", ["hub-weights", "zoo"])
def test_missing_hub_weights_are_one_message_naming_the_cache_in_use(stage, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    cache = tmp_path / "elsewhere" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(SystemExit) as e:
        main([stage, "--params", str(REPO / "profiles/imagenet.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"damagenet {stage}:") == 1
    models = [m for m in yaml.safe_load((REPO / "profiles/imagenet.yaml").read_text())["zoo"]["models"]
              if m.get("weights") == "hf-hub"]
    assert f"{len(models)} hub model(s) are not in the local cache" in err
    assert err.count(f"({cache})") == len(models) and ".cache/huggingface" not in err
    assert all(f"`hf download timm/{m['arch']}`" in err for m in models)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["label_file", "devkit", "kaggle", "hf_dataset", "wds"])
def test_every_other_layout_goes_through_the_profiles_prepare_stage(kind, tmp_path):
    """The README's lines for each layout but the wnid tree (which the whole profile rehearses above): the workspace
    ``scripts/run-profile`` makes with the README's settings, then its DVC prepare stage (the first stage of
    ``make imagenet`` that reads the images)."""
    tree = tmp_path / "tree"
    labels = write_ilsvrc_val(tree)
    stored = {n: (next(tree.glob(f"*/{n}")).read_bytes(), i) for n, i in labels.items()}
    data = tmp_path / "data"
    data.mkdir()
    settings = []
    if kind in ("label_file", "devkit", "kaggle"):
        val = data / "val"
        val.mkdir()
        for name, (image, _) in stored.items():
            (val / name).write_bytes(image)
        if kind == "label_file":
            (data / "val.txt").write_text("".join(f"{n} {i}\n" for n, i in labels.items()))
            label_file = data / "val.txt"
        elif kind == "devkit":
            devkit = write_devkit(data / "unpacked", labels)
            with tarfile.open(data / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
                tar.add(devkit, arcname=devkit.name)
            label_file = data / "ILSVRC2012_devkit_t12.tar.gz"
        else:
            write_kaggle(data / "LOC_val_solution.csv", labels, "ILSVRC2012_val_00000099")
            label_file = data / "LOC_val_solution.csv"
        settings = [f"source.data={data}", f"source.label_file={label_file}"]
    elif kind == "hf_dataset":
        write_hub_parquet(data / "hub", stored)
        val = data / "hub" / "datasets--ILSVRC--imagenet-1k"
    else:
        write_wds(data / "wds", stored)
        val = data / "wds"
    workspace = tmp_path / "ws"
    # IMAGENET_VAL sets source.root and source.data; SET's source.data (the README's line) wins
    plan = subprocess.run([str(REPO / "scripts/run-profile"), "--dry", str(REPO / "profiles/imagenet.yaml"),
                           str(workspace), f"source.root={val}", f"source.data={val}", f"source.kind={kind}",
                           *settings, "source.label_sets=null"], capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr[-3000:]
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "p")}
    run = subprocess.run(["dvc", "repro", "prepare"], cwd=workspace, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    clean = {s["json"]["source_file"]: s for s in iter_shardset(workspace / "data/shards/clean")}
    assert {name: s["cls"] for name, s in clean.items()} == labels
    assert {name: s["json"]["source_sha256"] for name, s in clean.items()} == {
        n: hashlib.sha256(data).hexdigest() for n, (data, _) in stored.items()}
    assert json.loads((workspace / "metrics/prepare.json").read_text())["rejects"] == (kind == "kaggle")
