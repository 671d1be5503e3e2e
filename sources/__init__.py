"""Image sources: indexing and robust reading (:mod:`sources.reading`), the embedded worlds. This module stays
import-light: the CLI catches :class:`BadSourceError` without importing torch."""

from __future__ import annotations

from pathlib import Path


class BadSourceError(ValueError):
    """A source file or label line that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason
