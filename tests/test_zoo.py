"""The model zoo: clear errors before heavy work, the normalising wrapper, weights round trips, the zoo flow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model_zoo.zoo import ModelSpec, ZooError, build_model
from pipelines.stages import read_models_file


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
    from sources.reading import Rejects, class_folder_source, load_images
    from training.supervised import accuracy

    metrics, out = trained_zoo["metrics"], trained_zoo["out"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    specs = read_models_file(out / "models.json")
    assert [s.name for s in specs] == ["vgg_demo", "resnet10t"]
    rejects = Rejects()
    xv, yv, _ = load_images(class_folder_source(trained_zoo["zoo"].val_root, rejects)[0], 32, rejects)
    for spec in specs:
        model = build_model(spec)  # reloaded from the saved safetensors
        assert accuracy(model, xv, yv) == pytest.approx(metrics[spec.name]["val_acc"], abs=0.01)
        assert metrics[spec.name]["val_acc"] > 50  # well above 10% chance even after a few epochs on 600 images


def test_training_history_has_one_row_per_epoch_with_the_epoch_end_measurements(tmp_path):
    """Per-epoch rows: the mean of the epoch's step losses (recomputed from a callback), the measurements taken in
    eval mode, and the curve file with the plotted column last."""
    import csv

    from training.supervised import Recipe, train_classifier, write_curve

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="t", arch="test_resnet", num_classes=3,
                                  data={"input_size": [3, 16, 16], "crop_pct": 1.0}))
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    modes, losses = [], []
    info = train_classifier(model, images, labels, Recipe(epochs=2, lr=0.01, batch_size=16, warmup_epochs=0),
                            callback=lambda step, m, opt: losses.append(None),
                            epoch_end=lambda m: modes.append(m.training) or {"val_acc": 12.5})
    assert [(r["epoch"], r["step"], r["val_acc"]) for r in info["history"]] == [(1, 3, 12.5), (2, 6, 12.5)]
    assert modes == [False, False] and len(losses) == 6
    assert all(r["train_loss"] > 0 for r in info["history"])
    write_curve(tmp_path / "c.csv", info["history"], last="train_loss")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert list(rows[0]) == ["epoch", "step", "val_acc", "train_loss"] and len(rows) == 2


def test_frozen_norm_keeps_batchnorm_statistics_and_plain_training_moves_them():
    from training.supervised import Recipe, train_classifier

    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 3, (32,))
    stats = {}
    for freeze in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelSpec(name="t", arch="test_resnet", num_classes=3,
                                      data={"input_size": [3, 16, 16], "crop_pct": 1.0}))
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        train_classifier(model, images, labels, Recipe(epochs=1, lr=0.01, batch_size=16, warmup_epochs=0,
                                                       freeze_norm=freeze))
        stats[freeze] = all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert stats == {True: True, False: False}


def test_a_tiny_last_batch_is_skipped_and_a_reasonable_one_kept():
    from training.supervised import batch_starts

    assert batch_starts(450, 64) == [0, 64, 128, 192, 256, 320, 384]  # 2 images left over: skipped
    assert batch_starts(500, 64) == [0, 64, 128, 192, 256, 320, 384, 448]  # 52 left over: a batch
    assert batch_starts(40, 16) == [0, 16, 32]  # 8 = batch / 2: kept
    assert batch_starts(3, 64) == [0]  # the only batch is never skipped


@pytest.mark.parametrize("width", [8, 16])
def test_cifar_preact_resnet_keeps_every_pixel_in_its_first_stage_and_carries_its_data_config(width):
    """The CO papers' network: 3x3 stride-1 stem, pre-activation basic blocks, stages of width x (1, 2, 4, 8) at
    strides 1, 2, 4, 8; a 32 px input reaches the head as 4x4 (timm's resnetv2_18 stem alone divides it by 4)."""
    import timm

    model = build_model(ModelSpec(name="p", arch="preact_resnet18_cifar", num_classes=10, kwargs={"width": width},
                                  data={"input_size": [3, 32, 32], "crop_pct": 1.0}))
    net = model.model
    assert net.stem.conv.stride == (1, 1) and net.stem.conv.out_channels == width
    seen = {}
    hooks = [net.stages[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, tuple(out.shape[1:])))
             for i in range(4)]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert seen == {i: (width * 2**i, 32 >> i, 32 >> i) for i in range(4)}
    assert [f["reduction"] for f in net.feature_info] == [1, 1, 2, 4, 8]
    cfg = timm.create_model("preact_resnet18_cifar", width=width).pretrained_cfg  # the architecture's own data config
    assert cfg["input_size"] == (3, 32, 32) and cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "head.fc"
    assert type(net.stages[0].blocks[0]).__name__ == "PreActBasic"
    assert timm.create_model("resnetv2_18").stem.conv.stride == (2, 2)  # the stock stem this one replaces


def test_mnist_cnn_is_the_one_channel_network_so_a_signed_gradient_step_stays_grey():
    """Wong et al.'s MNIST network: 16 and 32 filters of 4x4 at stride 2, 100 hidden units; on the channel mean, so
    its output on RGB equals a hand-built one-channel copy on the grey image, and the input gradient is the same in
    every channel (an FGSM step on a grey digit stays grey). No normalisation: pixels go in as they are."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="m", arch="mnist_cnn", num_classes=10,
                                  data={"input_size": [3, 28, 28], "crop_pct": 1.0}))
    net = model.model
    assert model.data_config["mean"] == (0.0, 0.0, 0.0) and model.data_config["std"] == (1.0, 1.0, 1.0)
    one_channel = torch.nn.Sequential(net.conv1, torch.nn.ReLU(), net.conv2, torch.nn.ReLU(), torch.nn.Flatten(),
                                      net.fc1, torch.nn.ReLU(), net.fc2)
    assert [tuple(m.weight.shape) for m in (net.conv1, net.conv2, net.fc1)] == [(16, 1, 4, 4), (32, 16, 4, 4), (100, 1568)]
    grey = torch.rand(4, 1, 28, 28)
    x = grey.expand(-1, 3, -1, -1).clone().requires_grad_(True)
    out = model(x)
    torch.testing.assert_close(out, one_channel(grey))
    out[:, 3].sum().backward()
    assert torch.equal(x.grad[:, 0], x.grad[:, 1]) and torch.equal(x.grad[:, 1], x.grad[:, 2])


def test_cifar_preact_resnet_checkpoint_loads_back_into_the_same_network(tmp_path):
    spec = ModelSpec(name="p", arch="preact_resnet18_cifar", num_classes=10, kwargs={"width": 8},
                     data={"input_size": [3, 32, 32], "crop_pct": 1.0})
    torch.manual_seed(0)
    model = build_model(spec)
    path = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(build_model(spec.replace(weights=str(path)))(x), model(x))


def test_zoo_records_source_and_sha256_of_a_local_weights_file_without_machine_paths(tmp_path, prefect_server):
    import hashlib

    from pipelines.config import Zoo
    from pipelines.flows.zoo import zoo_flow

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10))
    weights = tmp_path / "mine.safetensors"  # an absolute path, as a user may give one
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, weights)
    zoo = Zoo(out=str(tmp_path / "zoo"), data=str(tmp_path), num_classes=10, img_size=32,
              models=[{"name": "v", "arch": "vgg_demo", "weights": str(weights)}])
    metrics = zoo_flow(zoo, metrics_path=str(tmp_path / "zoo.json"))
    assert metrics["v"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert metrics["v"]["weights_source"] == "file:mine.safetensors"
    assert str(tmp_path) not in (tmp_path / "zoo.json").read_text()
