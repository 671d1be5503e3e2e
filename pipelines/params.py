"""``params.yaml``, read and validated in one place (schema: :mod:`pipelines.config`; each stage's arguments from
it: :mod:`pipelines.stages`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.config import ConfigError, Params, validate_params


def load_params(path: str | Path = "params.yaml") -> Params:
    """The parameters in ``path``, typed and checked against the schema; :class:`ConfigError` (one line) otherwise."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):  # never open a FIFO: the read would block
        raise ConfigError(f"{path}: not a regular file ({'a folder' if path.is_dir() else 'a FIFO, socket or device'}); "
                          "--params takes a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found (run from the repository root or pass --params)")
    try:
        with path.open() as f:
            params = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e} (YAML keeps only the last; DVC refuses the file)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return validate_params(params, str(path))


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} is given twice in one mapping (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def metrics_dir(params_path: str | Path) -> Path:
    """Where a run's metrics go: ``metrics/`` for ``params.yaml`` (what dvc.yaml declares), ``metrics/<stem>/``
    for any other parameters file, so a profile run never overwrites the default run's metrics."""
    name = Path(params_path)
    return Path("metrics") if name.name == "params.yaml" else Path("metrics") / name.stem
