"""Publishing shard sets with DVC: ``damagenet publish`` (``dvc push``) and ``damagenet fetch`` (``dvc pull``), with
the remote spelled out first and a clear error when a local remote is missing (DVC alone says "Is your cache up to
date?"). The default remote is a folder ``damagenet-dvc-remote`` beside the checkout (``.dvc/config``)."""

from __future__ import annotations

import contextlib
import os
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
    """``dvc pull`` of ``targets`` (stages, ``.dvc`` files, output folders or files inside them; all by default) from
    the default remote, with every downloaded object re-hashed by DVC (the remote's ``verify``, on for this pull): a
    damaged object never enters the cache, so it is named here and fetched again once the remote is repaired. Then
    each whole shard set fetched is checked against its ``SHA256SUMS``. Exit 1 naming each problem."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from shards.verify import verify_files

    name, url = default_remote(root)
    if _is_local(url) and not Path(url).is_dir():
        raise ConfigError(f"DVC remote '{name}' is {url}, which does not exist: publish there first "
                          f"(`damagenet publish`), or point the remote at the published copy with "
                          f"`dvc remote modify {name} url PATH_OR_URL`")
    print(f"fetching from DVC remote '{name}': {url}")
    with contextlib.chdir(root):  # DVC reads targets relative to the working folder
        repo = Repo(".", config={"remote": {name: {"verify": True}}})
        try:
            expected = _expected_files(repo, targets)
        except DvcException as e:
            raise ConfigError(f"{Path(root).resolve()}: cannot fetch {' '.join(targets)}: {e}") from None
        if any(not repo.cache.local.exists(md5) for _, md5 in expected):
            repo.drop_data_index()  # it still lists an object that failed its check before (DVC 3.67)
        try:
            repo.pull(targets=targets or None)
        except DvcException:
            pass  # what did not arrive is named below, file by file
        remote = repo.cloud.get_remote_odb(name)
        missing = {path for path, md5 in expected if not repo.cache.local.exists(md5)}
        problems = [f"{os.path.relpath(path)}: not fetched: "
                    + ("the remote's copy is damaged (its MD5 is not the one DVC recorded)" if remote.exists(md5)
                       else f"not in remote '{name}'")
                    + "; nothing of it was kept, so `damagenet fetch` gets it once the remote holds a sound copy"
                    for path, md5 in expected if path in missing]
        # a whole shard set that arrived is checked against the sums its publisher wrote
        sets = sorted({path.parent for path, _ in expected if path.name == "SHA256SUMS"
                       if not any(path.parent in m.parents for m in missing)})
        problems += [p for s in sets for p in verify_files(os.path.relpath(s))]
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(expected) - len(missing)} of {len(expected)} file(s) fetched; {len(sets)} shard set(s) checked "
          "against their SHA256SUMS: " + (f"{len(problems)} problem(s)" if problems else "OK"))
    return 1 if problems else 0


def _expected_files(repo, targets: list[str]) -> list[tuple[Path, str]]:
    """``(workspace path, MD5)`` of every file the targets name, from the hashes DVC recorded (a folder's listing
    is fetched first: it names the files)."""
    infos = [i for t in targets for i in repo.stage.collect_granular(t)] if targets else [
        i for s in repo.index.stages for i in repo.stage.collect_granular(s.addressing)]
    outs = {(out, info.filter_info) for info in infos for out in info.stage.outs if out.use_cache and out.hash_info}
    dirs = [out.hash_info for out, _ in outs if out.is_dir_checksum]
    if dirs:
        repo.cloud.pull(dirs, remote=None)  # the .dir listings themselves
    files = []
    for out, within in outs:
        base = Path(out.fs_path)
        if not (out.is_dir_checksum and repo.cache.local.exists(out.hash_info.value)):
            files.append((base, out.hash_info.value))  # a file, or a folder whose listing did not arrive
            continue
        entries = [(base.joinpath(*key), hi.value) for key, _, hi in out.get_obj()]
        files += [(p, md5) for p, md5 in entries if within is None or Path(within) in (p, *p.parents)]
    return sorted(set(files))
