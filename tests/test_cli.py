"""The `damagenet` CLI: every stage has a subcommand with help, and bad parameters fail clearly."""

from __future__ import annotations

import pytest

from pipelines.cli import build_parser, main


def test_every_dvc_stage_has_a_documented_subcommand(capsys):
    import yaml

    with open("dvc.yaml") as f:
        stages = yaml.safe_load(f)["stages"]
    commands = {s.get("cmd") or s["do"]["cmd"] for s in stages.values()}
    subcommands = {c.split()[1] for c in commands}
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in subcommands | {"verify", "serve"}:
        assert name in text
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        assert len(capsys.readouterr().out) > 100


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: parameters file not found"):
        main(["--params", str(tmp_path / "nope.yaml"), "prepare"])


def test_generate_names_an_attack_missing_from_params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("generate: {}\nattacks: {aoa: {}}\n")
    with pytest.raises(SystemExit, match="attack 'cw' has no entry under 'attacks'"):
        main(["--params", str(p), "generate", "--attack", "cw"])


def test_serve_builds_a_cron_scheduled_deployment():
    from pipelines.flows.report import evaluate_and_report_flow

    deployment = evaluate_and_report_flow.to_deployment(
        name="scheduled-evaluation", cron="0 3 * * *", parameters={"evaluate_kwargs": {}, "report_kwargs": {}})
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.flow_name == "evaluate-and-report"


def test_muso_check_prints_the_three_distances(capsys):
    main(["muso-check", "--n", "30", "--p", "200", "--forget", "5"])
    out = capsys.readouterr().out
    values = {line.split(":")[0].strip(): float(line.split(":")[1]) for line in out.splitlines() if ":" in line
              and line.strip().split(":")[0] in ("muso labels", "random labels", "no relabelling")}
    assert values["muso labels"] < 1e-6 < 1e-2 < min(values["random labels"], values["no relabelling"])


def test_downstream_stages_name_a_missing_model_or_recipe(tmp_path):
    p = tmp_path / "params.yaml"
    zoo = ("zoo: {out: z, img_size: 32, num_classes: 10, models: [{name: pre, arch: resnet18, weights: hf-hub}]}\n")
    p.write_text(zoo + "unlearn: {model: pre}\n" + "ood: {model: missing}\n")
    with pytest.raises(SystemExit, match="unlearn needs a retraining recipe.*'pre'"):
        main(["--params", str(p), "unlearn"])
    with pytest.raises(SystemExit, match="no zoo model named 'missing'"):
        main(["--params", str(p), "ood"])


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/imagenet.yaml"])
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
