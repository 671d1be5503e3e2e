"""Stage ``real-data``: write the real-photo world (both the wnid tree and the flat folder + val.txt)."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, get_run_logger

from sources.real_world import select_photos, write_real_world


@flow(name="real-data", flow_run_name="real-data-{profile}")
def real_data_flow(root: str, photos: list[str] | None = None, profile: str = "demo") -> dict[str, int]:
    chosen = select_photos(photos)
    out = Path(root)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = write_real_world(tmp, chosen)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # all or nothing, as the demo world
    get_run_logger().info("real world: %d photos of %d classes under %s (%s)", len(chosen),
                          len({p.wnid for p in chosen}), out, ", ".join(f"{p.name}={p.label}" for p in chosen))
    return counts
