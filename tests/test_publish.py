"""Publishing: a shard set produced by a DVC stage goes to a local remote with `dvc push` and comes back
byte-identical in another clone with `dvc pull`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.shardset import shard_name, write_index, write_shard

DVC = [sys.executable, "-m", "dvc"]


def _run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_push_pull_round_trip_is_byte_identical(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.publish import publish

    dvc = DVC
    repo, remote, clone, staged = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone", tmp_path / "staged"
    rng = np.random.default_rng(0)
    for s in range(2):
        write_shard(staged / shard_name("aoa", s), [
            {"key": f"k{10 * s + i}", "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "cls": i,
             "json": {"i": i}} for i in range(10)])
    write_index(staged, "aoa")
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(git + ["init", "-q"], repo)
    _run(dvc + ["init", "-q"], repo)
    _run(dvc + ["config", "core.analytics", "false"], repo)
    _run(dvc + ["remote", "add", "-d", "local", str(remote)], repo)
    _run(dvc + ["stage", "add", "-q", "-n", "generate", "-o", "data/shards/aoa",
                f"mkdir -p data/shards && cp -r {staged} data/shards/aoa"], repo)
    _run(dvc + ["repro", "-q"], repo)
    with pytest.raises(ConfigError, match=r"dvc.lock has changes git has not committed"):
        publish([], repo)  # what a clone would read does not describe what would be pushed
    assert not remote.exists()
    _run(git + ["add", "-A"], repo)
    _run(git + ["commit", "-qm", "shards"], repo)
    assert publish([], repo) == 0
    _run(git + ["clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data" / "shards" / "aoa").exists()
    _run(dvc + ["pull", "-q"], clone)
    published = sorted(p.relative_to(repo / "data") for p in (repo / "data").rglob("*") if p.is_file())
    pulled = sorted(p.relative_to(clone / "data") for p in (clone / "data").rglob("*") if p.is_file())
    assert published == pulled and len(pulled) == 7  # 2 shards + shardindex, _info, manifest, SHA256SUMS + .gitignore
    for rel in published:
        assert (repo / "data" / rel).read_bytes() == (clone / "data" / rel).read_bytes()


def test_dvc_metrics_show_reads_every_declared_metric(tmp_path):
    """Only JSON is declared as metrics (a Markdown report folder made `dvc metrics show` fail)."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(name, tmp_path / name)
    shutil.copytree("metrics", tmp_path / "metrics")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(DVC + ["init", "-q"], cwd=tmp_path, check=True)
    shown = subprocess.run(DVC + ["metrics", "show", "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    files = {f for entry in json.loads(shown.stdout).values() for f in entry["data"]}
    # the stage tables (a file per row), not the full records: each stage's table fits a screen
    assert "metrics/downstream/tables/adv_train/fgsm.json" in files and "metrics/tables/evaluate/aoa.json" in files
    assert "metrics/evaluate.json" not in files and not any(f.startswith("reports") for f in files)


def test_fetch_names_a_missing_local_remote_and_publish_creates_it(tmp_path, capsys):
    from pipelines.config import ConfigError
    from pipelines.publish import default_remote, fetch, publish

    repo, remote = tmp_path / "repo", tmp_path / "nowhere" / "remote"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _run(DVC + ["init", "-q"], repo)
    _run(DVC + ["remote", "add", "-d", "shared", "../nowhere/remote"], repo)  # a relative path, as ours
    assert default_remote(repo) == ("shared", str(tmp_path / "nowhere" / "remote"))
    with pytest.raises(ConfigError, match=r"DVC remote 'shared' is .*nowhere/remote, which does not exist"):
        fetch([], repo)
    assert publish([], repo) == 0 and remote.is_dir()
    assert f"publishing to DVC remote 'shared': {remote}" in capsys.readouterr().out


def test_plots_render_offline_to_svg_with_vega_bundled(tmp_path, monkeypatch):
    """`damagenet plots`: DVC's CSV curves become SVG files (no CDN script), image plots are inlined, missing files
    are listed, and nothing is left in the working folder."""
    import base64

    from pipelines.plots import render_plots

    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "sgd.csv").write_text("step,loss,val_acc\n1,2.0,10\n2,1.5,31\n3,1.2,47\n")
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
    (tmp_path / "fig.png").write_bytes(png)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    plots:\n      - curves:\n"
                                       "          cache: false\n          x: step\nplots:\n  - fig.png\n  - gone.png\n")
    subprocess.run(DVC + ["init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    files = render_plots("out")
    assert [f.name for f in files] == ["curves_sgd.csv.svg", "index.html"]
    svg = files[0].read_text()
    assert svg.startswith("<svg") and "val_acc" in svg and "<script" not in svg  # y: the last column
    index = files[1].read_text()
    assert 'src="curves_sgd.csv.svg"' in index and base64.b64encode(png).decode() in index
    assert "gone.png" in index.split("Not shown")[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dvc", ".dvcignore", "curves", "dvc.yaml", "fig.png", "out"]


def _published_repo(tmp_path, shard_bytes_after_sums=None):
    """A repository whose stage ``generate@aoa`` wrote a two-shard set, pushed to ``tmp_path/remote``."""
    from pipelines.publish import publish

    repo, staged = tmp_path / "repo", tmp_path / "staged"
    for s in range(2):
        write_shard(staged / shard_name("aoa", s), [{"key": f"k{s}", "image": np.full((8, 8, 3), s, np.uint8),
                                                     "cls": 1, "json": {}}])
    write_index(staged, "aoa")
    if shard_bytes_after_sums is not None:  # a publisher's set whose sums do not match its shard
        (staged / "aoa-000000.tar").write_bytes(shard_bytes_after_sums)
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(git + ["init", "-q"], repo)
    _run(DVC + ["init", "-q"], repo)
    _run(DVC + ["remote", "add", "-d", "shared", "../remote"], repo)
    (repo / "dvc.yaml").write_text("stages:\n  generate:\n    foreach: [aoa]\n    do:\n"
                                   f"      cmd: mkdir -p data/shards && cp -r {staged} data/shards/${{item}}\n"
                                   "      outs: ['data/shards/${item}']\n")
    _run(DVC + ["repro", "-q"], repo)
    _run(git + ["add", "-A"], repo)
    _run(git + ["commit", "-qm", "shards"], repo)
    assert publish([], repo) == 0
    return repo


def _fetch(repo, *targets):
    return subprocess.run([str(Path(sys.executable).with_name("damagenet")), "fetch", *targets], cwd=repo,
                          capture_output=True, text=True)


def test_fetch_verifies_every_target_and_fetches_again_once_the_remote_is_repaired(tmp_path):
    """DVC does not re-hash what it pulls unless its remote asks to: a damaged object arrived silently through a
    stage target or a file target, and stayed in the cache after the remote was repaired."""
    repo = _published_repo(tmp_path)
    shard = repo / "data" / "shards" / "aoa" / "aoa-000000.tar"
    good = shard.read_bytes()
    obj = next(p for p in (tmp_path / "remote").rglob("*") if p.is_file() and p.read_bytes() == good)
    damaged = bytearray(good)
    damaged[600] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(damaged))
    for target in ("generate@aoa", "data/shards/aoa/aoa-000000.tar", "data/shards/aoa", "dvc.yaml"):
        shutil.rmtree(repo / "data" / "shards")
        shutil.rmtree(repo / ".dvc" / "cache")
        run = _fetch(repo, target)
        assert run.returncode == 1, (target, run.stdout, run.stderr)
        assert run.stderr.splitlines() == [
            "data/shards/aoa/aoa-000000.tar: not fetched: the remote's copy is damaged (its MD5 is not the one DVC "
            "recorded); nothing of it was kept, so `damagenet fetch` gets it once the remote holds a sound copy"], (
            target, run.stderr)
        assert not any(p.read_bytes() == bytes(damaged) for p in repo.rglob("*") if p.is_file()), target
    single = _fetch(repo, "data/shards/aoa/aoa-000001.tar")  # a sound file alone: fetched, nothing else
    assert single.returncode == 0 and "1 of 1 file(s) fetched" in single.stdout, single.stderr
    obj.write_bytes(good)  # the remote repaired: the same command now fetches the set
    run = _fetch(repo, "generate@aoa")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert "6 of 6 file(s) fetched; 1 shard set(s) checked against their SHA256SUMS: OK" in run.stdout
    assert shard.read_bytes() == good
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=shard.parent).returncode == 0
    unknown = _fetch(repo, "generate@pgd")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1 and "generate@pgd" in unknown.stderr


def test_fetch_checks_a_whole_set_against_its_publishers_sums(tmp_path):
    """A set DVC moved faithfully can still disagree with the sums its publisher wrote."""
    repo = _published_repo(tmp_path, shard_bytes_after_sums=b"\0" * 1024)
    shutil.rmtree(repo / "data" / "shards")
    run = _fetch(repo, "generate@aoa")
    assert run.returncode == 1
    assert run.stderr.splitlines()[0] == "data/shards/aoa/aoa-000000.tar: checksum mismatch"
