"""The `damagenet` CLI: every stage has a subcommand with help, and bad parameters fail clearly."""

from __future__ import annotations

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


def test_generate_names_an_attack_missing_from_params(tmp_path):
    p = _params(tmp_path)
    with pytest.raises(SystemExit, match="attack 'cw' has no entry under 'attacks'"):
        main(["--params", str(p), "generate", "--attack", "cw"])


def test_serve_builds_a_cron_deployment_that_rereads_params_each_run(tmp_path):
    from pipelines.cli import evaluate_kwargs
    from pipelines.flows.report import scheduled_evaluation_flow
    from pipelines.params import load_params

    p = _params(tmp_path)
    deployment = scheduled_evaluation_flow.to_deployment(
        name="scheduled-evaluation", cron="0 3 * * *", parameters={"params_path": str(p)})
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters == {"params_path": str(p)}  # nothing frozen at start: the file is read per run
    before = [m["name"] for m in evaluate_kwargs(load_params(p))["models"]]
    _params(tmp_path, edit=lambda params: params["evaluate"]["models"].append("resnet10t_extra"))
    after = [m["name"] for m in evaluate_kwargs(load_params(p))["models"]]
    assert after == before + ["resnet10t_extra"]


def test_muso_check_prints_the_three_distances(capsys):
    main(["muso-check", "--n", "30", "--p", "200", "--forget", "5"])
    out = capsys.readouterr().out
    values = {line.split(":")[0].strip(): float(line.split(":")[1]) for line in out.splitlines() if ":" in line
              and line.strip().split(":")[0] in ("muso labels", "random labels", "no relabelling")}
    assert values["muso labels"] < 1e-6 < 1e-2 < min(values["random labels"], values["no relabelling"])


def test_downstream_stages_name_a_missing_model_or_recipe(tmp_path):
    def edit(params):
        params["zoo"]["models"] = [{"name": "pre", "arch": "resnet18", "weights": "hf-hub"}]
        params["unlearn"]["model"] = "pre"
        params["unlearn"].pop("original")  # no original trained here: retraining needs the zoo recipe
        params["ood"]["model"] = "missing"

    p = _params(tmp_path, edit=edit)
    with pytest.raises(SystemExit, match="unlearn needs a retraining recipe.*'pre'"):
        main(["--params", str(p), "unlearn"])
    with pytest.raises(SystemExit, match="no zoo model named 'missing'"):
        main(["--params", str(p), "ood"])


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/imagenet.yaml", "profiles/real.yaml",
                                     "profiles/experiment.yaml"])
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
