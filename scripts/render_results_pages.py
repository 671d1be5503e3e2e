#!/usr/bin/env python
"""Render the downstream pages of a committed experiment result again from its committed metrics and params, with
this checkout's page code (wording, verdict statistics, number format), without rerunning the hour of training:

    .venv/bin/python scripts/render_results_pages.py results/experiment results/label-noise

Reads ``<result>/params.yaml``, ``<result>/metrics/downstream/<stage>.json`` and, for adversarial training, the
per-check curves ``<result>/plots/downstream/adv_train/<run>.csv``; writes ``<result>/reports/downstream/<stage>/``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

from evaluators.downstream_report import adv_training_section, optim_section
from pipelines.config import AdvTrain, Optim


def _curves(folder: Path) -> dict[str, list[dict[str, float]]]:
    histories = {}
    for path in sorted(folder.glob("*.csv")):
        with open(path) as f:
            histories[path.stem] = [{k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in row.items()}
                                    for row in csv.DictReader(f)]
    return histories


def render(result: Path) -> list[str]:
    # the page's own sections typed (older results' files may lack sections added to the schema since)
    params = yaml.safe_load((result / "params.yaml").read_text())
    pages, reports = [], result / "reports" / "downstream"
    for stage in params.get("downstream", {}):
        metrics = json.loads((result / "metrics" / "downstream" / f"{stage}.json").read_text())
        if stage == "adv_train":  # rows in the params' order, as the stage wrote them (the JSON sorts its keys)
            histories = _curves(result / "plots" / "downstream" / "adv_train")
            cfg = AdvTrain.model_validate(params["adv_train"])
            metrics = {run: metrics[run] for run in cfg.runs}
            adv_training_section(metrics, {run: histories[run] for run in metrics}, cfg.monitor, cfg.final_eval,
                                 reports, chance=100 / params["zoo"]["num_classes"])
        elif stage == "optim":
            cfg = Optim.model_validate(params["optim"])
            metrics["optimizers"] = {n: metrics["optimizers"][n] for n in cfg.optimizers}
            metrics["lora"] = {n: metrics["lora"][n] for n in cfg.lora.runs}
            optim_section(metrics, cfg, reports)
        else:
            raise SystemExit(f"{result}: rendering the {stage} page from committed metrics is not supported")
        pages.append(str(reports / stage / "index.md"))
    return pages


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for folder in sys.argv[1:]:
        for page in render(Path(folder)):
            print(f"render_results_pages: {page}")
