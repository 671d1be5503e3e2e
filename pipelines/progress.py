"""A Prefect progress artifact that moves with the work inside units, not only when a unit finishes.

A flow registers its :class:`Progress` under its run id in ``RUNNING``; tasks running in the same process (thread
workers) look it up and report their unit's fraction. Tasks on Dask workers find nothing there, and the flow then
moves the artifact per finished unit only.
"""

from __future__ import annotations

import threading
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

UPDATE_EVERY_S = 5.0  # at most one API call per interval, whatever the number of units reporting


class Progress:
    def __init__(self, key: str, description: str, units: int):
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.units, self.done, self.lock, self.last = units, {}, threading.Lock(), 0.0

    def update(self, unit: str, fraction: float, force: bool = False) -> None:
        """Unit ``unit`` is ``fraction`` (0-1) done; the artifact shows the mean over all units."""
        with self.lock:
            self.done[unit] = fraction
            now = time.monotonic()
            if force or now - self.last > UPDATE_EVERY_S:
                self.last = now
                update_progress_artifact(self.id, 100.0 * sum(self.done.values()) / self.units)


RUNNING: dict[str, Progress] = {}  # flow run id -> its progress
