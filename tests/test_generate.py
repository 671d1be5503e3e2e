"""The prepare and generate stages: deterministic, resumable shards that standard readers and `verify` accept."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model_zoo.zoo import ModelSpec, build_model
from pipelines.config import Budget, Dask, Select, Source
from pipelines.flows.generate import generate
from pipelines.flows.prepare import prepare_flow
from shards.shardset import class_names, iter_shardset, shard_paths, write_shard
from shards.verify import verify_shardset

REPO = Path(__file__).resolve().parent.parent
BUDGET = {"eta": 5.0, "eps": 16.0, "alpha": 2.0, "max_steps": 6}


@pytest.fixture(scope="module")
def clean_set(small_world, prefect_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    source = Source(kind="class_folder", data=str(small_world), root=str(small_world / "val"), num_classes=10, size=32,
                    crop_pct=1.0, select=Select(mode="per_class", n=2), shard_size=5, out=str(out))
    metrics = prepare_flow(source, metrics_path=str(out.parent / "prepare.json"))
    return out, metrics


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="vgg_demo", arch="vgg_demo", num_classes=10))
    path = tmp_path_factory.mktemp("zoo") / "vgg_demo.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, path)
    return ModelSpec(name="vgg_demo", arch="vgg_demo", num_classes=10, weights=str(path))


def _run(clean, surrogate, out, attack="aoa", budget=BUDGET, **kw):
    options = {"si": 2} if attack == "aoa" else {}
    kw.setdefault("cpu_threads", 1)  # one thread per worker: the bytes do not depend on the worker count
    return generate(attack, Budget(**budget), options, surrogate, str(clean), str(out), batch_size=4, seed=0, **kw)


def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shard_paths(folder)}


@pytest.fixture(scope="module")
def reference_run(clean_set, surrogate, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoa_ref")
    metrics = _run(clean_set[0], surrogate, out, devices=["cpu"])
    return out, metrics


def test_prepare_selects_per_class_and_indexes(clean_set):
    clean, metrics = clean_set
    assert metrics == {"images": 20, "rejects": 0, "shards": 4, "selected": 20}
    samples = list(iter_shardset(clean))
    assert sorted(np.bincount([s["cls"] for s in samples]).tolist()) == [2] * 10
    assert all(len(s["json"]["source_sha256"]) == 64 and "." not in s["key"] for s in samples)


def test_one_and_two_workers_give_identical_shards_with_one_thread_each(clean_set, surrogate, reference_run,
                                                                         tmp_path):
    _run(clean_set[0], surrogate, tmp_path / "two", devices=["cpu", "cpu"])
    assert _tar_bytes(tmp_path / "two") == _tar_bytes(reference_run[0])
    assert (tmp_path / "two" / "SHA256SUMS").read_text() != ""
    assert len(_tar_bytes(reference_run[0])) == 4


def test_rerun_skips_complete_shards(clean_set, surrogate, reference_run, tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    first = sorted(shard_paths(reference_run[0]))[0]
    shutil.copy(first, out / first.name)
    stamp = (out / first.name).stat().st_mtime_ns
    metrics = tmp_path / "generate.json"
    made = _run(clean_set[0], surrogate, out, devices=["cpu"], metrics_path=str(metrics))
    assert (out / first.name).stat().st_mtime_ns == stamp
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])
    rate = json.loads(metrics.read_text())["images_per_second"]
    assert rate == made["images_per_second"] and rate > 0
    # nothing left to make: the rate stays the one measured by the run that made the shards (it was null)
    again = _run(clean_set[0], surrogate, out, devices=["cpu"], metrics_path=str(metrics))
    assert again["images_per_second"] == json.loads(metrics.read_text())["images_per_second"] == rate


@pytest.mark.slow
def test_rerun_with_other_parameters_or_weights_makes_every_shard_anew(clean_set, surrogate, reference_run,
                                                                       tmp_path, caplog):
    """The outputs persist across DVC reruns, so the job digest decides: shards of another job (another budget,
    other surrogate weights under the same file name) are never kept as done, and a rerun of the original job
    gives the original bytes back."""
    out = tmp_path / "stale"
    shutil.copytree(reference_run[0], out)
    _run(clean_set[0], surrogate, out, devices=["cpu"], budget={**BUDGET, "eta": 3.0})
    changed = _tar_bytes(out)
    assert set(changed) == set(_tar_bytes(reference_run[0]))
    assert all(changed[k] != v for k, v in _tar_bytes(reference_run[0]).items())
    assert "made by another job" in caplog.text
    assert max(s["json"]["rmsd"] for s in iter_shardset(out)) <= 3.0

    other = tmp_path / "other_weights.safetensors"
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in build_model(ModelSpec(name="vgg_demo", arch="vgg_demo",
                                                                   num_classes=10)).model.state_dict().items()}, other)
    moved = tmp_path / "moved"
    shutil.copytree(reference_run[0], moved)
    shutil.copy(other, surrogate.weights + ".new")
    original = Path(surrogate.weights).read_bytes()
    try:
        os.replace(surrogate.weights + ".new", surrogate.weights)  # same path, other bytes
        _run(clean_set[0], surrogate, moved, devices=["cpu"])
        assert all(v != _tar_bytes(reference_run[0])[k] for k, v in _tar_bytes(moved).items())
    finally:
        Path(surrogate.weights).write_bytes(original)
    _run(clean_set[0], surrogate, moved, devices=["cpu"])
    assert _tar_bytes(moved) == _tar_bytes(reference_run[0])


@pytest.mark.slow
def test_shards_made_by_other_attack_code_are_made_anew(clean_set, surrogate, reference_run, tmp_path,
                                                        monkeypatch, caplog):
    """DVC reruns generate when the attacks package changes; the shards already there were made by the old code, so
    they are another job, not complete ones (the records' job digest names the code); the same code keeps them."""
    import shards.job

    out = tmp_path / "old_code"
    shutil.copytree(reference_run[0], out)
    monkeypatch.setattr(shards.job, "code_digest", lambda: "other attack code")
    _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert "made by another job" in caplog.text
    digests = {s["json"]["job_digest"] for s in iter_shardset(out)}
    assert digests.isdisjoint(s["json"]["job_digest"] for s in iter_shardset(reference_run[0]))
    monkeypatch.undo()
    stamps = {p.name: p.stat().st_mtime_ns for p in shard_paths(out)}
    _run(clean_set[0], surrogate, out, devices=["cpu"])  # back to this code: made anew once, to the original bytes
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in shard_paths(out))


def test_a_shard_this_pipeline_did_not_write_is_refused_and_kept(clean_set, surrogate, reference_run, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    foreign = out / "aoa-000001.tar"
    write_shard(foreign, [{"key": "x", "image": np.zeros((32, 32, 3), np.uint8), "cls": 0, "json": {}}])
    before = foreign.read_bytes()
    with pytest.raises(RuntimeError, match=r"failed after retry: \['aoa-000001.tar'\]"):
        _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert foreign.read_bytes() == before


@pytest.mark.parametrize("name", ["my_notes.tar", "DAmageNet_download.tar", "aoa-000009.tar"])
def test_a_tar_this_pipeline_did_not_write_stops_the_stage_and_stays(clean_set, surrogate, tmp_path, name):
    """Files in the output folder that no clean shard maps to were deleted as 'stale' (rc 0, a warning). Only a
    shard with this pipeline's marks (the set's shard name, samples with a job digest) may go; anything else stops
    the stage naming it, before any shard is made."""
    from shards import NotOurs

    out = tmp_path / "set"
    out.mkdir()
    foreign = out / name
    write_shard(foreign, [{"key": "x", "image": np.zeros((32, 32, 3), np.uint8), "cls": 0, "json": {}}])
    before = foreign.read_bytes()
    with pytest.raises(NotOurs, match=re.escape(str(foreign))):
        _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert foreign.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.slow
def test_dask_local_cluster_gives_identical_shards(clean_set, surrogate, reference_run, tmp_path):
    _run(clean_set[0], surrogate, tmp_path / "dask", devices=["cpu", "cpu"], dask=Dask(n_workers=2))
    assert _tar_bytes(tmp_path / "dask") == _tar_bytes(reference_run[0])


def test_failing_device_is_reported_and_its_units_retried_elsewhere(clean_set, surrogate, reference_run, tmp_path,
                                                                    caplog):
    # "cuda:7" does not exist on this machine (nor on a one-GPU one): its units fail there and move to the CPU
    _run(clean_set[0], surrogate, tmp_path / "failover", devices=["cuda:7", "cpu"])
    assert _tar_bytes(tmp_path / "failover") == _tar_bytes(reference_run[0])
    assert "failed on cuda:7" in caplog.text


def test_a_failing_unit_is_reported_while_the_others_complete(clean_set, surrogate, reference_run, tmp_path):
    broken_clean = tmp_path / "clean"
    shutil.copytree(clean_set[0], broken_clean)
    victim = sorted(shard_paths(broken_clean))[2]
    victim.write_bytes(victim.read_bytes()[:700])  # a truncated input shard fails on every device
    with pytest.raises(RuntimeError, match=r"1 unit\(s\) failed after retry: \['aoa-000002.tar'\]"):
        _run(broken_clean, surrogate, tmp_path / "out", devices=["cpu", "cpu"])
    done = _tar_bytes(tmp_path / "out")
    ref = _tar_bytes(reference_run[0])
    assert set(done) == set(ref) - {"aoa-000002.tar"}
    assert all(done[k] == ref[k] for k in done)


@pytest.mark.slow
def test_sigkill_mid_shard_then_rerun_is_byte_identical(clean_set, surrogate, reference_run, tmp_path):
    out = tmp_path / "killed"
    script = (
        "import sys; from model_zoo.spec import ModelSpec; from pipelines.config import Budget; "
        "from pipelines.flows.generate import generate; "
        f"generate('aoa', Budget(**{BUDGET!r}), {{'si': 2}}, ModelSpec.model_validate_json(sys.argv[1]), "
        f"{str(clean_set[0])!r}, {str(out)!r}, "
        "batch_size=4, seed=0, devices=['cpu'], cpu_threads=1)"
    )
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's test server: no second start
    log = tmp_path / "child.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, surrogate.model_dump_json()], env=env,
                                stdout=err, stderr=err)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not list(out.glob("*.tmp")):
            time.sleep(0.01)
        killed_mid_shard = bool(list(out.glob("*.tmp")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed_mid_shard, f"no shard was being written when the run was killed; child log:\n{log.read_text()[-3000:]}"
    assert len(list(out.glob("*.tar"))) < 4
    _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert not list(out.glob("*.tmp"))
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])
    keys = [s["key"] for s in iter_shardset(out)]
    assert len(keys) == len(set(keys)) == 20


def _python_blocks(markdown: str) -> list[str]:
    return [block.split("```")[0] for block in markdown.split("```python\n")[1:]]


def _run_as_printed(code: str, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cwd.parent / "hf-home"))  # the datasets cache, not the user's
    namespace: dict = {}
    exec(compile(code, "snippet", "exec"), namespace)  # noqa: S102  (the snippet, verbatim)
    return namespace


def _check_readers(ns: dict, keys: set[str], names: list[str]) -> None:
    items = list(ns["ds"])
    assert len(items) == len(keys) and items[0][0].shape == (32, 32, 3) and items[0][2]["attack"] == "aoa"
    assert len(ns["timm_ds"]) == len(keys) and next(iter(ns["timm_ds"]))[0].size == (32, 32)
    hf = ns["hf_ds"]
    assert set(hf["__key__"]) == keys and hf[0]["json"]["attack"] == "aoa"  # the key and the JSON record survive
    assert hf.features["cls"].names == names and hf[0]["cls"] == hf[0]["json"]["label"]


def test_every_reader_the_card_and_the_readme_print_runs_as_printed(clean_set, reference_run, tmp_path, monkeypatch):
    out = reference_run[0]
    keys = {s["key"] for s in iter_shardset(out)}
    names = [n for _, n in sorted(class_names(clean_set[0]).items())]
    card = _python_blocks((out / "README.md").read_text())
    assert len(card) == 1
    ns = _run_as_printed(card[0], out, monkeypatch)
    _check_readers(ns, keys, names)
    readme = [b for b in _python_blocks((REPO / "README.md").read_text()) if "data/shards/aoa" in b]
    assert len(readme) == 1
    (tmp_path / "data" / "shards").mkdir(parents=True)
    shutil.copytree(out, tmp_path / "data" / "shards" / "aoa")
    _check_readers(_run_as_printed(readme[0], tmp_path, monkeypatch), keys, names)


def test_metrics_and_provenance(reference_run):
    out, metrics = reference_run
    assert metrics["images"] == 20 and metrics["rmsd_max"] <= BUDGET["eta"] and metrics["linf_max"] <= BUDGET["eps"]
    rec = next(iter_shardset(out))["json"]
    for field in ("source_sha256", "label", "wnid", "surrogate", "attack", "config_hash", "eta", "eps", "alpha",
                  "rmsd", "linf", "steps", "pred_before", "pred_after", "p_true_before", "p_true_after", "seed"):
        assert field in rec
    assert "aoa" in (out / "README.md").read_text()


def test_verify_catches_flipped_byte_missing_shard_and_over_budget(clean_set, reference_run, tmp_path):
    clean = clean_set[0]
    assert verify_shardset(reference_run[0], 10, clean) == []
    bad = tmp_path / "bad"
    shutil.copytree(reference_run[0], bad)
    shards = sorted(shard_paths(bad))
    data = bytearray(shards[0].read_bytes())
    data[2000] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    shards[1].unlink()
    problems = verify_shardset(bad, 10, clean)
    assert any("aoa-000000.tar: checksum mismatch" in p for p in problems)
    assert any("aoa-000001.tar: listed in SHA256SUMS but missing" in p for p in problems)
    # an image pushed over its RMSD budget: swap in a clean image from another key
    over = tmp_path / "over"
    shutil.copytree(reference_run[0], over)
    _replace_image(sorted(shard_paths(over))[3], np.zeros((32, 32, 3), np.uint8))
    problems = verify_shardset(over, 10, clean, budget=BUDGET)
    assert any("exceeds the run's budget" in p for p in problems)


def _replace_image(shard: Path, image: np.ndarray) -> None:
    from shards.shardset import read_shard, write_shard

    samples = list(read_shard(shard))
    samples[0]["image"] = image
    write_shard(shard, samples)


def test_verify_cli_exits_nonzero(reference_run, tmp_path):
    from pipelines.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(reference_run[0], bad)
    (bad / "_info.json").write_text("{}")
    params = tmp_path / "params.yaml"
    params.write_text("source: {kind: class_folder, data: src, root: src, num_classes: 10, size: 32, crop_pct: 1.0, "
                      "shard_size: 5, out: clean}\n")
    with pytest.raises(SystemExit) as e:
        main(["--params", str(params), "verify", str(bad)])
    assert e.value.code == 1


# ---- reliability cases (each failed before its fix) ----------------------------------------------------------------


def _source(root, out, **kw):
    return Source(**{"kind": "class_folder", "data": str(root), "root": str(root), "num_classes": 10, "size": 32,
                     "crop_pct": 1.0, "filter": "bicubic", "select": {"mode": "per_class", "n": 1, "seed": 0},
                     "shard_size": 4, "out": str(out), **kw})


def test_a_failed_prepare_keeps_the_previous_clean_set(small_world, prefect_server, tmp_path):
    out = tmp_path / "clean"
    prepare_flow(_source(small_world / "val", out), metrics_path=str(tmp_path / "m.json"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(Exception, match="source folder does not exist"):
        prepare_flow(_source(tmp_path / "no-such-folder", out), metrics_path=str(tmp_path / "m.json"))
    broken = tmp_path / "broken"
    shutil.copytree(small_world / "val", broken)
    (broken / sorted(p.name for p in broken.iterdir())[0] / "aaa_empty.jpg").write_bytes(b"")
    with pytest.raises(Exception, match="empty file"):
        prepare_flow(_source(broken, out, select={"mode": "all"}), metrics_path=str(tmp_path / "m.json"), strict=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert verify_shardset(out, 10) == []
    # no temporary folder left (the run's lock file stays, as filelock leaves it)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".clean.lock"]


def test_resume_covers_the_input_shard_and_indexes_this_runs_units_only(small_world, surrogate, prefect_server,
                                                                         tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "pgd"
    prepare_flow(_source(small_world / "val", clean), metrics_path=str(tmp_path / "m.json"))
    _run(clean, surrogate, out, attack="pgd", devices=["cpu"])
    prepare_flow(_source(small_world / "val", clean, select={"mode": "per_class", "n": 1, "seed": 1}),
                 metrics_path=str(tmp_path / "m.json"))  # same shard names, other images
    _run(clean, surrogate, out, attack="pgd", devices=["cpu"])  # every shard is another job now: made anew
    _run(clean, surrogate, tmp_path / "fresh", attack="pgd", devices=["cpu"])
    assert _tar_bytes(out) == _tar_bytes(tmp_path / "fresh") and len(shard_paths(out)) == 3
    prepare_flow(_source(small_world / "val", clean, shard_size=10), metrics_path=str(tmp_path / "m.json"))
    shutil.rmtree(out)
    _run(clean, surrogate, out, attack="pgd", devices=["cpu"])  # 1 shard now: nothing stale may stay indexed
    assert [p.name for p in shard_paths(out)] == ["pgd-000000.tar"]
    assert verify_shardset(out, 10, clean, budget=BUDGET) == []


def test_a_damaged_output_shard_is_named_and_regenerated(clean_set, surrogate, reference_run, tmp_path, caplog):
    out = tmp_path / "damaged"
    shutil.copytree(reference_run[0], out)
    shards = sorted(shard_paths(out))
    shards[1].write_bytes(shards[1].read_bytes()[:3000])  # truncated mid-member
    shards[3].write_bytes(b"")  # zero bytes
    _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])
    assert "aoa-000001.tar was damaged" in caplog.text and "aoa-000003.tar was damaged" in caplog.text


def test_a_second_generate_run_on_the_same_output_is_refused(clean_set, surrogate, tmp_path):
    from filelock import FileLock

    from shards.shardset import ShardWriter

    out = tmp_path / "busy"
    with FileLock(tmp_path / ".busy.lock"):
        with pytest.raises(RuntimeError, match="another generate run is writing this set"):
            _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert ShardWriter(out / "x.tar").tmp != ShardWriter(out / "x.tar").tmp  # two writers never share a temp file


def _rewrite(shard: Path, members: list[tuple[str, bytes | None]], link: str | None = None) -> None:
    """A tar with exactly these members (``None`` content: a directory; ``link``: add a symlink member)."""
    import io
    import tarfile

    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)


def _members(shard: Path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _broken_copy(reference, tmp_path, name, edit):
    out = tmp_path / name
    shutil.copytree(reference, out)
    edit(out, sorted(shard_paths(out))[0])
    return out


def test_verify_reports_every_gap_without_crashing(clean_set, reference_run, tmp_path):
    from common.files import sha256_file
    from shards.shardset import encode_png

    clean, ref = clean_set[0], reference_run[0]

    def relabel(out, shard):  # wrong but in range
        m = _members(shard)
        cls = next(i for i, (n, _) in enumerate(m) if n.endswith(".cls"))
        m[cls] = (m[cls][0], str((int(m[cls][1]) + 1) % 10).encode())
        _rewrite(shard, m)

    def duplicate(out, shard):  # the first sample written twice, adjacent
        m = _members(shard)
        _rewrite(shard, m[:3] + m)

    def raised_eta(out, shard):  # over budget, with the sample's own record claiming a bigger budget
        m = _members(shard)
        key = m[0][0].split(".")[0]
        meta = json.loads(next(d for n, d in m if n == f"{key}.json"))
        meta["eta"] = 99.0
        m = [(n, encode_png(np.zeros((32, 32, 3), np.uint8)) if n == f"{key}.png" else
              json.dumps(meta).encode() if n == f"{key}.json" else d) for n, d in m]
        _rewrite(shard, m)

    def wrong_size(out, shard):
        m = _members(shard)
        m[[n for n, _ in m].index(next(n for n, _ in m if n.endswith(".png")))] = (
            next(n for n, _ in m if n.endswith(".png")), encode_png(np.zeros((20, 24, 3), np.uint8)))
        _rewrite(shard, m)

    cases = {
        "relabel": (relabel, True, "the clean image's label is"),
        "duplicate": (duplicate, False, "duplicate key"),
        "raised_eta": (raised_eta, True, "exceeds the run's budget"),
        "wrong_size": (wrong_size, False, "the set's images are 32x32"),
        "wrong_size_clean": (wrong_size, True, "the set's images are 32x32"),
        "symlink": (lambda out, shard: _rewrite(shard, _members(shard), link="evil.png"), False, "not a regular file"),
        "directory": (lambda out, shard: _rewrite(shard, [("somedir", None)] + _members(shard)), False,
                      "not a regular file"),
        "blank_sums_line": (lambda out, shard: (out / "SHA256SUMS").write_text(
            (out / "SHA256SUMS").read_text() + "\n"), False, "SHA256SUMS:"),
        "garbled_index": (lambda out, shard: (out / "shardindex.json").write_text("{not json"), False,
                          "unreadable wids index"),
    }
    for name, (edit, with_clean, expected) in cases.items():
        out = _broken_copy(ref, tmp_path, name, edit)
        if name not in ("blank_sums_line", "garbled_index"):  # checksums match: only the content is wrong
            names = [line.split(maxsplit=1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()]
            (out / "SHA256SUMS").write_text("".join(f"{sha256_file(out / n)}  {n}\n" for n in names))
        problems = verify_shardset(out, 10, clean if with_clean else None, budget=BUDGET if with_clean else None)
        assert any(expected in p for p in problems), (name, problems)
    from pipelines.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("source: {kind: class_folder, data: src, root: src, num_classes: 10, size: 32, crop_pct: 1.0, "
                      f"shard_size: 5, out: clean}}\nbudget: {json.dumps(BUDGET)}\n")
    with pytest.raises(SystemExit) as e:
        main(["--params", str(params), "verify", str(tmp_path / "raised_eta"), "--clean", str(clean)])
    assert e.value.code == 1


def test_pickle_members_are_refused_and_never_run(reference_run, tmp_path):
    import pickle

    import webdataset as wds

    from evaluators.classification import shard_loader
    from shards.shardset import read_shard

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    out = tmp_path / "pickled"
    shutil.copytree(reference_run[0], out)
    shard = sorted(shard_paths(out))[0]
    m = _members(shard)
    key = m[0][0].split(".")[0]
    _rewrite(shard, m[:3] + [(f"{key}.pyd", pickle.dumps(Payload()))] + m[3:])
    with pytest.raises(ValueError, match=r"members \['cls', 'json', 'png', 'pyd'\]"):
        list(read_shard(shard))
    with pytest.raises(ValueError, match=r"members \['pyd'\]"):
        list(shard_loader(out, batch_size=4))
    card = (reference_run[0] / "README.md").read_text()
    snippet = card.split("```python")[1].split("```")[0]
    assert "{000000..000003}" in snippet  # the set's real shard range
    scope = {}  # the snippet's webdataset reader, on the shard with the pickle
    reader = "import webdataset as wds\n" + snippet[snippet.index("ds = ("):snippet.index("timm_ds = ")]
    exec(reader.replace('"aoa-{000000..000003}.tar"', repr(str(shard))), scope)
    assert len(list(scope["ds"])) == 5
    assert not marker.exists()
    assert wds  # the snippet's import


def test_prefect_runs_are_named_after_the_stage_attack_and_shard(reference_run):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_runs = {r.name for r in client.read_flow_runs()}
        task_runs = {t.name for t in client.read_task_runs()}
    assert "generate-demo-aoa" in flow_runs  # the stage, the profile (here the default) and the attack set
    assert {f"attack-aoa-{i:06d}" for i in range(4)} <= task_runs


def test_the_cards_are_hub_cards_with_every_field_explained_on_one_scale(clean_set, reference_run):
    """Loaded back with huggingface_hub (a local file: offline), as the Hub validates a card's header."""
    from huggingface_hub import DatasetCard

    from sources.demo_world import CLASSES

    for folder, name in ((clean_set[0], "clean"), (reference_run[0], "aoa")):
        card = DatasetCard.load(folder / "README.md")
        d = card.data.to_dict()
        features = {f["name"]: f["dtype"] for f in d["dataset_info"]["features"]}
        assert features["__key__"] == "string" and features["png"] == "image" and features["json"] == "json"
        names = features["cls"]["class_label"]["names"]
        assert names == {str(i): f"{i:02d}_{c}" for i, c in enumerate(CLASSES)}  # the class folders, in index order
        assert d["configs"][0]["data_files"][0] == {"split": "validation", "path": f"{name}-*.tar"}
        assert d["dataset_info"]["splits"] == [{"name": "validation", "num_examples": 20}]
        assert d["dataset_info"]["download_size"] == sum(p.stat().st_size for p in shard_paths(folder))
        assert d["size_categories"] == ["n<1K"] and ("adversarial-examples" in d["tags"]) == (name == "aoa")
        if name == "aoa":  # the set's name (the card once carried the provenance dict's repr here)
            assert d["pretty_name"] == "aoa adversarial images (DAmageNet-style)"
        # the source's defaults: ImageNet's terms, which the Hub wants named and linked
        assert (d["license"], d["license_name"], d["license_link"]) == (
            "other", "ImageNet terms of access", "https://image-net.org/download")
        assert d["source_datasets"] == ["extended|ILSVRC/imagenet-1k"]
        assert "@article{chen2022aoa," in card.text and "eprint  = {2001.06325}" in card.text
        table = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", card.text, re.M))
        fields = {k for s in iter_shardset(folder) for k in s["json"]}
        assert fields <= set(table) and len(fields) >= (5 if name == "clean" else 23), fields - set(table)
    parameters = d["damagenet"]["parameters"]  # the attack set's: budgets on the 0-255 scale, as everywhere else
    assert (parameters["eta"], parameters["eps"], parameters["alpha"]) == (BUDGET["eta"], BUDGET["eps"], BUDGET["alpha"])
    assert d["damagenet"]["numbers"]["images"] == 20 and "| eta | 5.0 |" in card.text


def test_verify_holds_the_card_to_the_set(clean_set, reference_run, tmp_path):
    """Before: an edited card (another attack, a smaller RMSD), re-summed, passed `damagenet verify`."""
    from common.files import sha256_file
    from shards.shardset import write_sums

    damagenet = [str(Path(sys.executable).with_name("damagenet")), "--params", str(REPO / "params.yaml"), "verify"]
    for edit in ("rmsd", "attack", "text", "names"):
        bad = tmp_path / edit
        shutil.copytree(reference_run[0], bad)
        card = (bad / "README.md").read_text()
        rmsd_max = re.search(r"rmsd_max: (\S+)", card).group(1)
        card = {"rmsd": card.replace(f"rmsd_max: {rmsd_max}", "rmsd_max: 3.1").replace(
                    f"| rmsd_max | {rmsd_max} |", "| rmsd_max | 3.1 |"),
                "attack": card.replace("method: aoa", "method: pgd").replace("the `aoa` attack", "the `pgd` attack"),
                "text": card.replace("after rounding to uint8", "before rounding"),
                "names": card.replace("'3': 03_triangle", "'3': 03_circle")}[edit]
        (bad / "README.md").write_text(card)
        sums = [line.split("  ") for line in (bad / "SHA256SUMS").read_text().splitlines()]
        write_sums(bad, {name: sha256_file(bad / name) for _, name in sums})  # re-summed: only the card check tells
        run = subprocess.run(damagenet + [str(bad)], capture_output=True, text=True)
        assert run.returncode == 1, (edit, run.stdout, run.stderr)
        expected = {"rmsd": "damagenet.numbers says {'images': 20", "attack": "damagenet.attack (attack) says ['pgd'], "
                    "the set has ['aoa']", "text": "its text is not the one its header gives",
                    "names": "class names says"}[edit]
        assert run.stdout.splitlines()[0].startswith(f"{bad / 'README.md'}: ") and expected in run.stdout, run.stdout
        assert len(run.stdout.splitlines()) == 2, run.stdout  # the problem, then the summary
    good = subprocess.run(damagenet + [str(reference_run[0])], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.endswith(": OK\n"), good.stdout


def _job(clean_set, surrogate, out, **kw):
    from model_zoo.zoo import weights_sha256
    from shards.job import ShardJob, split_options

    config, own = split_options("aoa", "aoa", Budget(**BUDGET), {"si": 2})
    return ShardJob(in_shard=str(shard_paths(clean_set[0])[0]), out_shard=str(out / "aoa-000000.tar"), in_sha256="x",
                    method="aoa", config=config, attack_options=own, budget=Budget(**BUDGET), surrogate=surrogate,
                    surrogate_sha256=weights_sha256(surrogate), batch_size=4, seed=0, **{"sub_batch": "auto", **kw})


def test_the_job_digest_is_the_sha256_of_what_decides_the_bytes_and_nothing_of_where_it_runs():
    import dataclasses
    import hashlib

    from attacks import code_digest
    from shards.job import ShardJob, split_options

    budget = Budget(**BUDGET)
    config, own = split_options("mi", "mi-fgsm", budget, {})  # the preset (mi 1.0) is the method's code, not its config
    spec = ModelSpec(name="s", arch="vgg_demo", num_classes=10, weights="w.safetensors")
    job = ShardJob(in_shard="a/clean-000000.tar", out_shard="b/mi-000000.tar", in_sha256="c" * 64, method="mi-fgsm",
                   config=config, attack_options=own, budget=budget, surrogate=spec, surrogate_sha256="d" * 64,
                   batch_size=4, seed=3)
    fields = {"in_sha256": "c" * 64, "attack": "mi-fgsm", "attack_kwargs": {}, "budget": BUDGET,
              "config": {**dataclasses.asdict(config), "precision": "fp32", "sub_batch": 2},
              "surrogate": {"name": "s", "arch": "vgg_demo", "num_classes": 10, "weights": "w.safetensors"},
              "surrogate_sha256": "d" * 64, "batch_size": 4, "seed": 3, "attack_code": code_digest()}
    expected = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert job.digest("fp32", 2) == expected and fields["config"]["mi"] == 0.0
    where = dataclasses.replace(job, in_shard="x.tar", out_shard="y/mi-000000.tar", sub_batch="auto",
                                workers_per_device=3, recorded_sha256="e" * 64)
    assert where.digest("fp32", 2) == expected  # where and how it runs is not what it makes
    assert job.digest("bf16", 2) != expected and dataclasses.replace(job, seed=4).digest("fp32", 2) != expected


def test_a_sets_options_split_into_the_shared_config_and_the_methods_own_and_a_stray_one_is_named():
    from attacks import AttackConfig
    from shards.job import constructor_options, split_options

    # what the registry's classes take besides the shared config: AoA's loss weight and SGLRP conventions only
    assert constructor_options("aoa") == {"lam", "explicit", "bounds", "relu", "inactive_pool"}
    assert constructor_options("pgd") == constructor_options("bsr") == set()
    config, own = split_options("aoa-authors", "aoa", Budget(**BUDGET), {"si": 4, "si_x_twice": True, "lam": 2.0,
                                                                       "bounds": "channel"})
    assert own == {"lam": 2.0, "bounds": "channel"}
    assert config == AttackConfig(eta=BUDGET["eta"] / 255, eps=BUDGET["eps"] / 255, alpha=BUDGET["alpha"] / 255,
                                  max_steps=BUDGET["max_steps"], si=4, si_x_twice=True)
    with pytest.raises(ValueError, match=r"attacks.pgd-lam: lam is not an option of pgd \(its own: none"):
        split_options("pgd-lam", "pgd", Budget(**BUDGET), {"lam": 2.0})


def test_activation_bytes_and_auto_sub_batch_follow_their_formula(monkeypatch):
    import torch.nn as nn

    from attacks import create_attack, memory

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert memory.activation_bytes(net, 8) == (256 + 256 + 256 + 10) * 4  # every leaf's output, float32
    model = build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10))
    attack = create_attack("aoa", model)
    per_copy = 12.0 * memory.activation_bytes(model, 32)  # AoA.memory_factor, measured (attacks.memory)
    monkeypatch.setattr(memory, "total_memory", lambda device: 2**30)
    assert memory.auto_sub_batch(attack, 32, "cpu", workers=1) == int(0.5 * 2**30 // per_copy)
    assert memory.auto_sub_batch(attack, 32, "cpu", workers=3) == int(0.5 * 2**30 / 3 // per_copy)
    monkeypatch.setattr(memory, "total_memory", lambda device: 1000)
    assert memory.auto_sub_batch(attack, 32, "cpu", workers=1) == 1  # never zero copies
    # what is free now only warns, naming the parameter; it never changes the copies (the bytes depend on them)
    monkeypatch.setattr(memory, "free_memory", lambda device: 3 * per_copy)
    with pytest.warns(RuntimeWarning, match=r"2 worker\(s\) x 2 image copies .*set generate.sub_batch lower"):
        memory.warn_if_short(attack, 32, "cpu", copies=2, workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.warn_if_short(attack, 32, "cpu", copies=3, workers=1)


def test_auto_sizes_for_the_containers_memory_and_does_not_warn_when_that_is_free(tmp_path, monkeypatch):
    # a container limited to a quarter of the machine's RAM: `auto` sizes for the limit, and with the limit free
    # it warns of nothing (sized for the machine's RAM it warned "need about 24.0 GiB" on a 23 GiB container)
    from attacks import create_attack, memory

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = physical // 4
    (tmp_path / "memory.max").write_text(f"{limit}\n")  # cgroup v2
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    assert memory.total_memory("cpu") == limit
    model = build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10))
    attack = create_attack("aoa", model)
    per_copy = memory.copy_bytes(attack, 32, "cpu")
    copies = memory.auto_sub_batch(attack, 32, "cpu", workers=2)
    assert copies == int(0.5 * limit / 2 // per_copy)
    monkeypatch.setattr(memory, "free_memory", lambda device: int(0.9 * limit))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.warn_if_short(attack, 32, "cpu", copies=copies, workers=2)
    # no limit set: "max" in v2, a huge number in v1 (as on this project's machines); then the machine's RAM
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.total_memory("cpu") == physical
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory.total_memory("cpu") == physical


def test_out_of_memory_names_the_parameter_and_leaves_no_partial_file(clean_set, surrogate, tmp_path, monkeypatch):
    from attacks.base import Attack
    from shards.adversarial import attack_shard_file

    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 4294967296 bytes")

    monkeypatch.setattr(Attack, "__call__", no_memory)
    with pytest.raises(MemoryError, match=r"aoa-000000.tar: out of memory on cpu .*set generate.sub_batch"):
        attack_shard_file(_job(clean_set, surrogate, tmp_path, sub_batch=3), "cpu")
    assert list(tmp_path.iterdir()) == []


def test_progress_is_reported_per_step_and_a_stop_ends_between_steps(clean_set, surrogate, tmp_path):
    import shards
    from shards.adversarial import attack_shard_file

    calls = []
    result = attack_shard_file(_job(clean_set, surrogate, tmp_path), "cpu",
                               on_step=lambda done, total, step, active: calls.append((done, total, step, active)))
    assert result["count"] == 5 and calls[0] == (0, 5, 1, 4) and calls[-1][0] == 4  # batches of 4, then 1
    assert all(0 <= a <= 4 for *_, a in calls) and max(c[2] for c in calls) <= BUDGET["max_steps"]

    out = tmp_path / "stopped"
    seen = []

    def stop_at_step_2(done, total, step, active):
        seen.append(step)
        if step == 2:
            shards.STOP.set()

    try:
        with pytest.raises(shards.Stopped, match="stopped at step 3"):
            attack_shard_file(_job(clean_set, surrogate, out), "cpu", on_step=stop_at_step_2)
    finally:
        shards.STOP.clear()
    assert seen == [1, 2] and list(out.iterdir()) == []  # the partial shard is gone


def test_a_kept_shard_whose_bytes_changed_is_made_anew_and_its_sum_never_blessed(clean_set, surrogate,
                                                                                   reference_run, tmp_path, caplog):
    """A byte flipped inside a PNG leaves the tar, the keys and the records readable: only the checksum recorded
    when the shard was made tells. The resume makes it anew; SHA256SUMS keeps the true sums."""
    import tarfile

    out = tmp_path / "flipped"
    shutil.copytree(reference_run[0], out)
    shard = out / "aoa-000002.tar"
    with tarfile.open(shard) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[png.offset_data + png.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert "aoa-000002.tar was damaged (its checksum differs from the one SHA256SUMS recorded)" in caplog.text
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])
    assert (out / "SHA256SUMS").read_bytes() == (reference_run[0] / "SHA256SUMS").read_bytes()
