"""Files the pipeline writes and checks: content hashes and atomic JSON."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def sha256_file(path: Path | str) -> str:
    """The file's sha256, read in 1 MiB blocks (weight files are GBs): provenance of sources, shards and weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any, pretty: bool = True) -> None:
    """``obj`` as JSON, sorted and indented (stable bytes for DVC diffs; ``pretty=False``: compact, for large cache
    records), written to a temporary file beside ``path`` and renamed over it: a kill mid-write leaves the old file
    or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of this process and thread (not mkstemp's 0600 file): the result gets the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n" if pretty else json.dumps(obj))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
