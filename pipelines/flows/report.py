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
from pipelines import stages
from pipelines.flows import artifact_key
from pipelines.flows.evaluate import evaluate
from pipelines.params import load_params


@flow(name="report", flow_run_name="report-{profile}")
def report_flow(eval_dir: str, shards_root: str, clean_dir: str, sets: list[str], surrogate: dict[str, Any],
                budget: dict[str, Any], out_dir: str, profile: str = "demo", examples: int = 4,
                victims: list[str] | None = None, attacks: dict[str, Any] | None = None,
                downstream: list[str] | None = None, downstream_dir: str | None = None,
                set_surrogates: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    result = build_report(eval_dir, shards_root, clean_dir, sets, surrogate, budget, out_dir, profile, examples,
                          victims, attacks, downstream, downstream_dir, set_surrogates)
    # figures inline: the Prefect UI cannot follow links to files on this machine
    create_markdown_artifact(key=artifact_key(profile, "robustness-report"), markdown=result["markdown_inline"],
                             description="DAmageNet robustness report")
    log = get_run_logger()
    for w in result["warnings"]:
        log.warning("sanity check: %s", w)
    log.info("report written to %s/report.md and report.html", out_dir)
    return result


def _scheduled_run_name() -> str:
    from prefect.runtime import flow_run

    return "scheduled-evaluation-" + load_params(flow_run.parameters["params_path"]).profile


@flow(name="scheduled-evaluation", flow_run_name=_scheduled_run_name)
def scheduled_evaluation_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    params = load_params(params_path)  # at every run: a model added to the file is evaluated at the next one
    evaluate(**stages.evaluate(params))
    return report_flow(**stages.report(params))
