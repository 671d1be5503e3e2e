"""The generate stage under DVC: a stop (SIGTERM to the whole `dvc repro`, SIGINT to `damagenet generate`) ends
within seconds, keeps every finished shard and leaves no partial file; the next `dvc repro` makes only the missing
shards (the outputs persist) and the set is byte-identical to an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from model_zoo.zoo import ModelSpec, build_model, save_weights
from pipelines.config import Budget
from pipelines.flows.generate import generate
from pipelines.stages import read_models_file
from shards.shardset import shard_paths

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
BUDGET = {"eta": 7.0, "eps": 16.0, "alpha": 1.0, "max_steps": 12}


@pytest.fixture
def workspace(tmp_path, small_world):
    """A DVC project with this repository's dvc.yaml: 20 images of the small world in 4 shards, a local surrogate."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(REPO / "dvc.yaml", ws)
    for code in ("attacks", "common", "evaluators", "model_zoo", "pipelines", "shards", "sources", "training"):  # deps
        shutil.copytree(REPO / code, ws / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(small_world / "val", ws / "images")
    for folder in ("data/downstream", "reports/downstream"):  # evaluate and report read them (README only here)
        (ws / folder).mkdir(parents=True)
        shutil.copy(REPO / folder / "README.md", ws / folder)
    torch.manual_seed(0)
    save_weights(build_model(ModelSpec(name="sur", arch="vgg_demo", num_classes=10)), ws / "weights/sur.safetensors")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(worlds={}, downstream={}, budget=BUDGET, attacks={"aoa": {"si": 2}})
    params["zoo"] = {"out": "data/zoo", "data": "weights", "num_classes": 10, "img_size": 32,
                     "models": [{"name": "sur", "arch": "vgg_demo", "weights": "weights/sur.safetensors"}]}
    params["source"].update(data="images", root="images", select={"mode": "per_class", "n": 2, "seed": 0}, shard_size=5)
    params["generate"].update(surrogate="sur", batch_size=5, cpu_workers=1, cpu_threads=1)
    params["evaluate"].update(models=["sur"], sets=["clean", "aoa"])
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(DVC + ["init", "-q", "--no-scm"], cwd=ws, check=True)
    return ws


def _env():
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's test server
            "DVC_NO_ANALYTICS": "1"}  # no analytics daemon outliving the run


def _signal(sig: int, group: bool):
    return lambda proc: os.killpg(proc.pid, sig) if group else proc.send_signal(sig)


def _stop_mid_shard(cmd: list[str], cwd: Path, out: Path, stop, log: Path, env=None, stderr: Path | None = None
                    ) -> tuple[int, float]:
    """Start ``cmd``, call ``stop(process)`` once a shard is finished and the next one is being written; returns the
    exit code and the seconds from the stop to the exit. Its output goes to ``log`` (stderr too, unless given)."""
    with open(log, "w") as f, open(stderr or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=f, stderr=err if stderr else f,
                                start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (
                list(out.glob("*.tar")) and list(out.glob("*.tmp"))):
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before it could be stopped:\n{log.read_text()[-3000:]}"
        sent = time.time()
        stop(proc)
        code = proc.wait(timeout=60)
        took = time.time() - sent
    for _ in range(100):  # nothing of the run is left behind (a Prefect server, a loader worker)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return code, took
        time.sleep(0.1)
    left = subprocess.run(["ps", "-o", "pid,stat,args", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    raise AssertionError(f"processes of the stopped run are still there:\n{left}")


@pytest.mark.slow
def test_stopped_generate_resumes_through_dvc_with_only_the_missing_shards(workspace, prefect_server, tmp_path):
    out = workspace / "data/shards/aoa"
    code, took = _stop_mid_shard(DVC + ["repro", "generate@aoa"], workspace, out, _signal(signal.SIGTERM, True),
                                 tmp_path / "term.log")
    assert code != 0 and took < 15, (code, took)
    assert not list(out.glob("*.tmp"))
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in shard_paths(out)}
    assert 1 <= len(kept) < 4

    resumed = subprocess.run(DVC + ["repro", "generate@aoa"], cwd=workspace, env=_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name, (ino, mtime, _) in kept.items():  # DVC kept them (persist) and generate did not redo them
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (ino, mtime), name
    assert f"{4 - len(kept)} shards written, {len(kept)} already complete" in resumed.stdout + resumed.stderr

    surrogate = read_models_file(workspace / "data/zoo/models.json")[0]
    reference = tmp_path / "reference"
    os.chdir(workspace)  # the spec's weights path is relative to the project, as the stage ran it
    try:
        generate("aoa", Budget(**BUDGET), {"si": 2}, surrogate, "data/shards/clean", str(reference), sub_batch="auto",
                 batch_size=5, devices=["cpu"], cpu_threads=1)
    finally:
        os.chdir(REPO)
    assert {p.name: p.read_bytes() for p in shard_paths(out)} == {p.name: p.read_bytes()
                                                                   for p in shard_paths(reference)}

    # Ctrl-C on the stage command itself: the flow run ends Failed with the finished shards kept
    for p in shard_paths(out)[2:]:
        p.unlink()
    code, took = _stop_mid_shard(["damagenet", "generate", "--attack", "aoa"], workspace, out,
                                 _signal(signal.SIGINT, False), tmp_path / "int.log")
    text = (tmp_path / "int.log").read_text()
    assert code == 130 and took < 15, (code, took, text[-2000:])
    assert "stopping after the current attack step" in text and "Finished in state Failed" in text
    assert not list(out.glob("*.tmp")) and 2 <= len(shard_paths(out)) < 4


@contextlib.contextmanager
def _prefect_server(tmp_path: Path):
    """A real `prefect server start` (scheduler included) on a free port; yields it and the env that points at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**_env(), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(tmp_path / "home")}
    server = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield server, env
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_scheduled_run_fires_on_a_real_server_and_goes_through_dvc(workspace, tmp_path):
    """Before: on Prefect's temporary server nothing ever ran; with a server, the run wrote reports/ outside DVC
    (`dvc status` stale) and was named after the parameters file."""
    with _prefect_server(tmp_path) as (_, env), open(tmp_path / "serve.log", "w") as log:
        minute = (time.gmtime(time.time() + 75).tm_min) % 60  # once, a minute or two from now (UTC, Prefect's default)
        serve = subprocess.Popen(["damagenet", "serve", "--cron", f"{minute} * * * *"], cwd=workspace, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            runs, deadline = [], time.time() + 480  # that minute, then hub_weights .. report on 20 images
            while time.time() < deadline and not any(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")
                                                     for r in runs):
                time.sleep(5)
                query = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/filter", method="POST",
                                               data=json.dumps({"flows": {"name": {"any_": ["scheduled-evaluation"]}}}
                                                               ).encode(), headers={"Content-Type": "application/json"})
                runs = json.loads(urllib.request.urlopen(query, timeout=10).read())
        finally:
            os.killpg(serve.pid, signal.SIGINT)
            serve.wait(60)
    done = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert done, (runs, (tmp_path / "serve.log").read_text()[-3000:])
    assert done[0]["name"] == f"scheduled-evaluation-{yaml.safe_load((workspace / 'params.yaml').read_text())['profile']}"
    assert (workspace / "reports/report.md").is_file() and (workspace / "metrics/evaluate.json").is_file()
    status = subprocess.run(DVC + ["status", "--json"], cwd=workspace, env=env, capture_output=True, text=True)
    assert set(json.loads(status.stdout)) <= {"hub_weights"}, status.stdout  # DVC recorded what the run wrote


@pytest.mark.slow
def test_a_prefect_server_that_dies_mid_run_ends_it_in_seconds_in_one_line(workspace, prefect_server, tmp_path):
    """Before: the run failed 59 s after its server died, with six task tracebacks in its log and Prefect's own
    errors on stderr."""
    made = subprocess.run(DVC + ["repro", "prepare", "zoo"], cwd=workspace, env=_env(), capture_output=True, text=True)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    out = workspace / "data/shards/aoa"
    with _prefect_server(tmp_path) as (server, env):
        code, took = _stop_mid_shard(["damagenet", "generate", "--attack", "aoa"], workspace, out,
                                     lambda _: os.killpg(server.pid, signal.SIGKILL), tmp_path / "out.log", env,
                                     stderr=tmp_path / "err.log")
    log, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert code == 1 and took < 30, (code, took, err[-2000:])
    lines = [line for line in err.split("\n") if line and not line.startswith("generate aoa:")]  # not the progress bar
    assert lines == [f"damagenet generate: the Prefect API at {env['PREFECT_API_URL']} stopped answering ([Errno 111] "
                     "Connection refused); what finished is kept: run the command again once it is back (or unset "
                     "PREFECT_API_URL for a temporary local server)"], err
    assert "Traceback" not in log + err
    assert not list(out.glob("*.tmp")) and shard_paths(out)
