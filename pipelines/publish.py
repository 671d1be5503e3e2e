"""Publishing shard sets with DVC: ``damagenet publish`` (``dvc push``) and ``damagenet fetch`` (``dvc pull``), with
the remote spelled out first and a clear error when a local remote is missing (DVC alone says "Is your cache up to
date?"). The default remote is a folder ``damagenet-dvc-remote`` beside the checkout (``.dvc/config``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipelines.config import ConfigError


def default_remote(root: str | Path = ".") -> tuple[str, str]:
    """``(name, url)`` of the repository's default DVC remote; a local path comes back absolute."""
    from dvc.repo import Repo

    config = Repo(str(root)).config
    name = config["core"].get("remote")
    if not name or name not in config["remote"]:
        raise ConfigError(f"{Path(root).resolve() / '.dvc' / 'config'}: no default DVC remote; add one with "
                          "`dvc remote add -d NAME URL`")
    return name, config["remote"][name]["url"]


def _is_local(url: str) -> bool:
    return "://" not in url


def _dvc(args: list[str], root: str | Path) -> int:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root).returncode


def publish(targets: list[str], root: str | Path = ".") -> int:
    """``dvc push`` to the default remote (a missing local remote folder is created), only once ``dvc.lock`` is
    committed: a consumer's clone reads that file to know which objects to fetch."""
    lock = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock"], cwd=root, capture_output=True,
                          text=True)
    if lock.returncode == 0 and lock.stdout.strip():
        raise ConfigError(f"{Path(root).resolve() / 'dvc.lock'} has changes git has not committed: commit it first "
                          "(`git add dvc.lock && git commit`), or a clone would fetch other shards than these")
    name, url = default_remote(root)
    if _is_local(url):
        Path(url).mkdir(parents=True, exist_ok=True)
    print(f"publishing to DVC remote '{name}': {url}")
    return _dvc(["push", *targets], root)


def fetch(targets: list[str], root: str | Path = ".") -> int:
    """``dvc pull`` from the default remote, then every fetched shard set's files against its ``SHA256SUMS``
    (exit 1 naming each problem); a local remote that does not exist is named as such."""
    name, url = default_remote(root)
    if _is_local(url) and not Path(url).is_dir():
        raise ConfigError(f"DVC remote '{name}' is {url}, which does not exist: publish there first "
                          f"(`damagenet publish`), or point the remote at the published copy with "
                          f"`dvc remote modify {name} url PATH_OR_URL`")
    print(f"fetching from DVC remote '{name}': {url}")
    code = _dvc(["pull", *targets], root)
    if code:
        return code
    # DVC does not check what it pulls against its hashes: a damaged object would arrive silently
    from shards.verify import verify_files

    sets = [Path(root) / t for t in targets] if targets else list((Path(root) / "data" / "shards").glob("*"))
    problems = [p for s in sets if (s / "SHA256SUMS").is_file() for p in verify_files(s)]
    for p in problems:
        print(p, file=sys.stderr)
    checked = sum((s / "SHA256SUMS").is_file() for s in sets)
    print(f"fetched; {checked} shard set(s) checked against their SHA256SUMS: "
          + (f"{len(problems)} problem(s)" if problems else "OK"))
    return 1 if problems else 0
