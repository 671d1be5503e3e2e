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
