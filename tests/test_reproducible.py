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


def machine_kernel_levels() -> list[str]:
    """The ATen kernel levels this CPU can run, asked of torch in a process whose kernels nobody chose (forcing a
    level the CPU lacks kills the process with SIGILL): ``default`` always, then up to the CPU's best."""
    env = {k: v for k, v in os.environ.items() if k not in MACHINE_KERNELS}
    best = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    levels = ["default", "avx2", "avx512"]
    return levels[: levels.index(best.lower()) + 1] if best.lower() in levels else ["default"]


def test_kernel_levels_are_those_the_cpu_has():
    levels = machine_kernel_levels()
    assert levels[0] == "default" and "avx2" in levels  # every machine of this project's kind has AVX2
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("avx512" in levels) == (" avx512f" in flags)


@pytest.mark.slow
def test_the_switch_gives_the_same_weights_under_any_kernel_level(tmp_path, small_world, prefect_server):
    """Every level this CPU has (AVX-512 only where it has it), with the switch on: one set of bytes."""
    levels = machine_kernel_levels()
    machines = [{"ATEN_CPU_CAPABILITY": level} for level in levels]
    pinned = [_train(tmp_path, small_world, {"threads": 2}, m, f"on-{i}") for i, m in enumerate(machines)]
    assert all(p == pinned[0] for p in pinned)
    # the setting can tell: without the switch, the CPU's best kernels and the plain ones write other bytes
    free = [_train(tmp_path, small_world, None, m, f"off-{i}") for i, m in enumerate([machines[-1], machines[0]])]
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
