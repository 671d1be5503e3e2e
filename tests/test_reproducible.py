"""The ``reproducible`` switch: the zoo stage, run as DVC runs it (a fresh `damagenet` process), writes the same
weight bytes whichever kernels the machine would pick, and refuses when it cannot pin them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MACHINE_KERNELS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def _train(tmp_path: Path, small_world: Path, reproducible, kernels: dict[str, str], tag: str) -> bytes:
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / tag
    zoo = {"out": str(out), "data": str(small_world), "train_root": str(small_world / "train"), "val_root": str(small_world / "val"),
           "img_size": 32, "num_classes": 10, "seed": 0,
           "models": [{"name": "net", "arch": "resnet10t", "recipe": {"epochs": 1, "lr": 0.002}}]}
    params = tmp_path / f"{tag}.yaml"
    params.write_text(yaml.safe_dump({"reproducible": reproducible, "zoo": zoo}))
    env = {k: v for k, v in os.environ.items() if k not in MACHINE_KERNELS}  # as a user's shell would have them
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "zoo", "--params", str(params)], cwd=tmp_path,
                         env={**env, **kernels, "PREFECT_API_URL": PREFECT_API_URL.value()}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return (out / "net.safetensors").read_bytes()


@pytest.mark.slow
def test_the_switch_gives_the_same_weights_under_any_kernel_level(tmp_path, small_world, prefect_server):
    machines = [{"ATEN_CPU_CAPABILITY": "avx512"}, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                {"ATEN_CPU_CAPABILITY": "default"}]
    pinned = [_train(tmp_path, small_world, {"threads": 2}, m, f"on-{i}") for i, m in enumerate(machines)]
    assert pinned[0] == pinned[1] == pinned[2]
    # the setting can tell: without the switch, AVX-512 and plain kernels write other bytes
    free = [_train(tmp_path, small_world, None, m, f"off-{i}") for i, m in enumerate(machines[::2])]
    assert free[0] != free[1]


def test_a_process_whose_kernels_are_already_chosen_is_refused(tmp_path):
    """The libraries read their setting once: a switch applied after the first tensor operation cannot act."""
    code = ("import torch; torch.ones(2).sum(); from pipelines.reproducible import pin_cpu; "
            "pin_cpu(1)")
    env = {k: v for k, v in os.environ.items() if k not in MACHINE_KERNELS}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**env, "ATEN_CPU_CAPABILITY": "default"})
    assert run.returncode != 0 and "ATen runs DEFAULT kernels, not AVX2" in run.stderr
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"  # this test process: pinned by conftest
