"""Stage ``demo-data``: write the procedural demo world."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, get_run_logger

from sources.demo_world import CLASSES, generate_demo_world


@flow(name="demo-data", flow_run_name="demo-data-{profile}")
def demo_data_flow(root: str, seed: int, size: int, train: int, val: int, outliers: int = 0,
                   profile: str = "demo") -> dict[str, int]:
    out = Path(root)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = generate_demo_world(tmp, seed=seed, size=size, counts={"train": train, "val": val}, outliers=outliers)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # all or nothing: a crash never leaves a half-written world behind
    get_run_logger().info("demo world: %s images of %d classes under %s", counts, len(CLASSES), out)
    return counts
