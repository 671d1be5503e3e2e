"""Image sources: indexing and robust reading (:mod:`sources.reading`), the embedded worlds. This module stays
import-light: the CLI catches :class:`BadSourceError` without importing torch."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path | str) -> str:
    """The file's sha256, read in 1 MiB blocks (weight files are GBs): provenance of sources, shards and weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BadSourceError(ValueError):
    """A source file or label line that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason
