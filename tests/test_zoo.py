"""The model zoo: clear errors before heavy work, the normalising wrapper, weights round trips, the zoo flow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model_zoo.zoo import ModelSpec, ZooError, build_model


def test_unknown_architecture_names_it():
    with pytest.raises(ZooError, match="unknown timm architecture 'resnet_does_not_exist'"):
        build_model(ModelSpec(name="x", arch="resnet_does_not_exist"))


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ZooError, match=f"weights file {missing} not found"):
        build_model(ModelSpec(name="x", arch="resnet10t", weights=str(missing)))


def test_hub_weights_absent_from_cache_are_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ZooError, match="not in the local Hugging Face cache"):
        build_model(ModelSpec(name="v", arch="vgg19.tv_in1k", weights="hf-hub"))


def test_wrapper_normalisation_matches_timm_transform():
    from PIL import Image
    from timm.data import create_transform

    model = build_model(ModelSpec(name="r", arch="resnet10t", num_classes=10, data={"input_size": (3, 32, 32), "crop_pct": 1.0}))
    cfg = model.data_config
    assert cfg["input_size"] == (3, 32, 32)
    img = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    timm_tensor = create_transform(**cfg, is_training=False)(img)
    x01 = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    torch.testing.assert_close(model.normalize(x01)[0], timm_tensor, rtol=1e-6, atol=1e-6)
    lo, hi = model.input_bounds()
    torch.testing.assert_close(lo.flatten(), -torch.tensor(cfg["mean"]) / torch.tensor(cfg["std"]))
    torch.testing.assert_close(hi.flatten(), (1 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"]))


def test_local_weights_round_trip(tmp_path):
    spec = ModelSpec(name="v", arch="vgg_demo", num_classes=10)
    torch.manual_seed(1)
    a = build_model(spec)
    path = tmp_path / "v.safetensors"
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, path)
    torch.manual_seed(2)  # a different random init, overwritten by the file
    b = build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10, weights=str(path)))
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert b.data_config["input_size"] == (3, 32, 32)


@pytest.mark.slow
def test_zoo_flow_trains_saves_and_reports(trained_zoo):
    from model_zoo.training import accuracy
    from sources.reading import Rejects, class_folder_source, load_images

    metrics, out = trained_zoo["metrics"], trained_zoo["out"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    specs = json.loads((out / "models.json").read_text())
    assert [s["name"] for s in specs] == ["vgg_demo", "resnet10t"]
    rejects = Rejects()
    xv, yv, _ = load_images(class_folder_source(trained_zoo["zoo"]["val_root"], rejects)[0], 32, rejects)
    for spec in specs:
        model = build_model(spec)  # reloaded from the saved safetensors
        assert accuracy(model, xv, yv) == pytest.approx(metrics[spec["name"]]["val_acc"], abs=0.01)
        assert metrics[spec["name"]]["val_acc"] > 50  # well above 10% chance even after a few epochs on 600 images
