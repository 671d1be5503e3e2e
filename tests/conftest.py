"""Shared fixtures: outputs go to tmp_path; one Prefect test server for the session; tiny worlds and models."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.reproducible import PINNED_ENV  # noqa: E402

# the kernels params.yaml's `reproducible` switch pins, set before the first tensor operation (the libraries read
# them once): tests that run a stage in-process then meet the same kernels the switch asks for
os.environ.update(PINNED_ENV)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server for every test that runs a flow (a start costs ~12 s)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small demo world (32 px, 10 classes): 600 train, 200 val images."""
    from sources.demo_world import generate_demo_world

    root = tmp_path_factory.mktemp("demo_world")
    generate_demo_world(root, seed=0, size=32, counts={"train": 600, "val": 200})
    return root


@pytest.fixture(scope="session")
def trained_zoo(small_world, prefect_server, tmp_path_factory):
    """The zoo flow run on the small world with short recipes: a trained VGG-style surrogate and a ResNet victim."""
    from pipelines.config import Zoo
    from pipelines.flows.zoo import zoo_flow

    out = tmp_path_factory.mktemp("zoo")
    zoo = Zoo(**{
        "out": str(out),
        "data": str(small_world),
        "train_root": str(small_world / "train"),
        "val_root": str(small_world / "val"),
        "img_size": 32,
        "num_classes": 10,
        "seed": 0,
        "models": [
            {"name": "vgg_demo", "arch": "vgg_demo", "role": "surrogate", "recipe": {"epochs": 4, "lr": 0.002}},
            {"name": "resnet10t", "arch": "resnet10t", "role": "victim", "recipe": {"epochs": 3, "lr": 0.002}},
        ],
    })
    metrics = zoo_flow(zoo, metrics_path=str(out / "metrics.json"))
    return {"zoo": zoo, "metrics": metrics, "out": out}

