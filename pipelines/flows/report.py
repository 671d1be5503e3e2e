"""Stage ``report``: the robustness report (Markdown + HTML), also published as a Prefect artifact.

``evaluate_and_report_flow`` chains evaluate and report; ``damagenet serve`` runs it on a cron schedule so models
added to the list are evaluated against the published shards (cached results are reused for the others).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from evaluators.report import build_report
from pipelines.flows.evaluate import evaluate


@flow(name="report")
def report_flow(eval_dir: str, shards_root: str, clean_dir: str, sets: list[str], surrogate: dict[str, Any],
                eta: float, out_dir: str, profile: str = "demo", examples: int = 4,
                victims: list[str] | None = None) -> dict[str, Any]:
    result = build_report(eval_dir, shards_root, clean_dir, sets, surrogate, eta, out_dir, profile, examples, victims)
    create_markdown_artifact(key="damagenet-robustness-report", markdown=result["markdown"],
                             description="DAmageNet robustness report")
    get_run_logger().info("report written to %s/report.md and report.html", out_dir)
    return result


@flow(name="evaluate-and-report")
def evaluate_and_report_flow(evaluate_kwargs: dict[str, Any], report_kwargs: dict[str, Any]) -> dict[str, Any]:
    evaluate(**evaluate_kwargs)
    return report_flow(**report_kwargs)
