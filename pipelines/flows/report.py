"""Stage ``report``: the robustness report (Markdown + HTML), also published as a Prefect artifact.

``scheduled_evaluation_flow`` runs ``dvc repro evaluate report`` in a DVC project; ``damagenet serve`` runs it on a
cron schedule. The stages read the project's ``params.yaml`` at every run, so a model added to ``evaluate.models`` is
evaluated against the published shards at the next run, without a restart (cached results are reused for the
others), and DVC records what they wrote: ``dvc status`` stays true after a scheduled run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from common.budget import Budget
from evaluators.report import ReportInput, build_report
from model_zoo.spec import ModelSpec
from pipelines.flows import artifact_key
from pipelines.params import load_params


@flow(name="report", flow_run_name="report-{profile}")
def report_flow(eval_dir: str, shards_root: str, clean_dir: str, sets: list[str], surrogate: ModelSpec, budget: Budget,
                out_dir: str, methods: dict[str, str], options: dict[str, dict[str, Any]],
                set_surrogates: dict[str, ModelSpec], profile: str = "demo", examples: int = 4,
                victims: list[str] | None = None, downstream: list[str] | None = None,
                downstream_dir: str | None = None) -> dict[str, Any]:
    """The robustness report of the evaluate stage's results (:mod:`evaluators.report`)."""
    result = build_report(ReportInput(
        eval_dir=Path(eval_dir), shards_root=Path(shards_root), clean_dir=Path(clean_dir), sets=sets,
        surrogate=surrogate, budget=budget, out_dir=Path(out_dir), methods=methods, options=options,
        set_surrogates=set_surrogates, profile=profile, examples=examples, victims=victims, downstream=downstream,
        downstream_dir=Path(downstream_dir) if downstream_dir else None))
    # figures inline: the Prefect UI cannot follow links to files on this machine
    create_markdown_artifact(key=artifact_key(profile, "robustness-report"), markdown=result["markdown_inline"],
                             description="DAmageNet robustness report")
    log = get_run_logger()
    for w in result["warnings"]:
        log.warning("sanity check: %s", w)
    log.info("report written to %s/report.md and report.html", out_dir)
    return result


SCHEDULED_STAGES = ("evaluate", "report")


def _scheduled_run_name() -> str:
    from prefect.runtime import flow_run

    return "scheduled-evaluation-" + load_params(Path(flow_run.parameters["project"]) / "params.yaml").profile


@flow(name="scheduled-evaluation", flow_run_name=_scheduled_run_name)
def scheduled_evaluation_flow(project: str) -> None:
    """``dvc repro evaluate report`` in ``project`` (and whatever those stages need that is out of date), its output
    in this run's log; a failure fails the run with DVC's last lines."""
    log = get_run_logger()
    # the stages' commands (damagenet ...) from this environment, whatever PATH the server's worker has
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    last = deque(maxlen=5)
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", *SCHEDULED_STAGES], cwd=project, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            if line.strip():
                log.info("%s", line.rstrip())
                last.append(line.strip())
    if proc.returncode:
        raise RuntimeError(f"dvc repro {' '.join(SCHEDULED_STAGES)} in {project} failed (exit {proc.returncode}): "
                           + " | ".join(last))
