"""The prepare and generate stages: deterministic, resumable shards that standard readers and `verify` accept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model_zoo.zoo import ModelSpec, build_model
from pipelines.flows.generate import generate
from pipelines.flows.prepare import prepare_flow
from shards.shardset import iter_shardset, shard_paths
from shards.verify import verify_shardset

BUDGET = {"eta": 5.0, "eps": 16.0, "alpha": 2.0, "max_steps": 6}


@pytest.fixture(scope="module")
def clean_set(small_world, prefect_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    source = {"kind": "class_folder", "root": str(small_world / "val"), "num_classes": 10, "size": 32,
              "crop_pct": 1.0, "filter": "bicubic", "select": {"mode": "per_class", "n": 2, "seed": 0},
              "shard_size": 5, "out": str(out)}
    metrics = prepare_flow(source, metrics_path=str(out.parent / "prepare.json"))
    return out, metrics


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="vgg_demo", arch="vgg_demo", num_classes=10))
    path = tmp_path_factory.mktemp("zoo") / "vgg_demo.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, path)
    return {"name": "vgg_demo", "arch": "vgg_demo", "num_classes": 10, "weights": str(path)}


def _run(clean, surrogate, out, attack="aoa", **kw):
    options = {"si": 2} if attack == "aoa" else {}
    return generate(attack, BUDGET, options, surrogate, str(clean), str(out), batch_size=4, seed=0, **kw)


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


def test_one_and_two_workers_give_identical_shards(clean_set, surrogate, reference_run, tmp_path):
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
    _run(clean_set[0], surrogate, out, devices=["cpu"])
    assert (out / first.name).stat().st_mtime_ns == stamp
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])


def test_rerun_with_other_parameters_refuses_to_reuse_shards(clean_set, surrogate, reference_run, tmp_path):
    out = tmp_path / "stale"
    shutil.copytree(reference_run[0], out)
    with pytest.raises(RuntimeError, match="failed after retry"):
        generate("aoa", {**BUDGET, "eta": 3.0}, {"si": 2}, surrogate, str(clean_set[0]), str(out), batch_size=4,
                 seed=0, devices=["cpu"])
    assert _tar_bytes(out) == _tar_bytes(reference_run[0])  # nothing overwritten or lost


def test_dask_local_cluster_gives_identical_shards(clean_set, surrogate, reference_run, tmp_path):
    _run(clean_set[0], surrogate, tmp_path / "dask", devices=["cpu", "cpu"], dask={"n_workers": 2})
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


def test_sigkill_mid_shard_then_rerun_is_byte_identical(clean_set, surrogate, reference_run, tmp_path):
    out = tmp_path / "killed"
    script = (
        "import json, sys; from pipelines.flows.generate import generate; "
        f"generate('aoa', {BUDGET!r}, {{'si': 2}}, json.loads(sys.argv[1]), {str(clean_set[0])!r}, {str(out)!r}, "
        "batch_size=4, seed=0, devices=['cpu'])"
    )
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's test server: no second start
    log = tmp_path / "child.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(surrogate)], env=env,
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


def test_webdataset_and_timm_read_the_set(reference_run):
    import timm.data
    import webdataset as wds

    out = reference_run[0]
    urls = [str(p) for p in shard_paths(out)]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("png", "cls")
    items = list(ds)
    assert len(items) == 20 and items[0][0].shape == (32, 32, 3)
    timm_ds = timm.data.create_dataset("wds/aoa", root=str(out), split="validation")
    img, target = next(iter(timm_ds))
    assert img.size == (32, 32) and 0 <= target < 10
    assert len(timm_ds) == 20


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
    problems = verify_shardset(over, 10, clean)
    assert any("exceeds budget" in p for p in problems)


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
    params.write_text("source: {num_classes: 10}\n")
    with pytest.raises(SystemExit) as e:
        main(["--params", str(params), "verify", str(bad)])
    assert e.value.code == 1
