"""Shard sets (:mod:`shards.shardset`), the per-shard generation job (:mod:`shards.adversarial`), checks
(:mod:`shards.verify`).

``STOP`` is how a run is stopped cleanly: the CLI sets it on SIGINT/SIGTERM, and every running job stops after its
current attack step, deleting its unfinished shard and keeping every finished one.
"""

import threading

STOP = threading.Event()


class Stopped(RuntimeError):
    """A job stopped on request (``STOP``) before it finished."""


class NotOurs(RuntimeError):
    """A file in an output folder that this pipeline did not write: refused, never replaced or removed."""
