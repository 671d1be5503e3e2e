"""Stage ``report``: the robustness report (Markdown + HTML), also published as a Prefect artifact.

``scheduled_evaluation_flow`` chains evaluate and report from a parameters file that it reads at the start of every
run; ``damagenet serve`` runs it on a cron schedule, so a model added to ``evaluate.models`` is evaluated against the
published shards at the next run, without a restart (cached results are reused for the others).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from evaluators.report import build_report
from pipelines.flows.evaluate import evaluate


@flow(name="report", flow_run_name="report-{profile}")
def report_flow(eval_dir: str, shards_root: str, clean_dir: str, sets: list[str], surrogate: dict[str, Any],
                budget: dict[str, Any], out_dir: str, profile: str = "demo", examples: int = 4,
                victims: list[str] | None = None, attacks: dict[str, Any] | None = None,
                downstream: list[str] | None = None, downstream_dir: str | None = None) -> dict[str, Any]:
    result = build_report(eval_dir, shards_root, clean_dir, sets, surrogate, budget, out_dir, profile, examples,
                          victims, attacks, downstream, downstream_dir)
    # figures inline: the Prefect UI cannot follow links to files on this machine
    create_markdown_artifact(key="damagenet-robustness-report", markdown=result["markdown_inline"],
                             description="DAmageNet robustness report")
    log = get_run_logger()
    for w in result["warnings"]:
        log.warning("sanity check: %s", w)
    log.info("report written to %s/report.md and report.html", out_dir)
    return result


@flow(name="scheduled-evaluation", flow_run_name="scheduled-evaluation-{params_path}")
def scheduled_evaluation_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    from pipelines.cli import evaluate_kwargs, report_kwargs  # the CLI's reading of params, at run time
    from pipelines.params import load_params

    params = load_params(params_path)
    evaluate(**evaluate_kwargs(params))
    return report_flow(**report_kwargs(params))
