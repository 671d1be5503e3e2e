"""What ``dvc metrics show metrics/tables/<stage>`` prints: one small table per stage, a row per model, attack set or
run, its headline numbers as columns. Each row is a file ``metrics/tables/<stage>/<row>.json`` (DVC prints a row
per file); the full record of the stage stays in ``metrics/<stage>.json`` (a plain output), where the pages read it.

DVC prints every metrics file in one table whose columns are the union of their keys, so nested per-model or
per-set records make tables thousands of characters wide; these rows keep each stage's table to a screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.files import write_json


def table_dir(metrics_path: str | Path) -> Path:
    """``metrics/zoo.json`` -> ``metrics/tables/zoo``: a folder of this module's own beside the full record, so
    removing a stale row can never touch another file."""
    path = Path(metrics_path)
    return path.parent / "tables" / path.stem


def write_table(metrics_path: str | Path, rows: dict[str, dict[str, Any]]) -> None:
    """One JSON file per row; row files of an earlier run that this one has not (a model no longer listed) go.
    The folder exists even with no rows (a zoo of untrained models), as dvc.yaml declares it."""
    folder = table_dir(metrics_path)
    folder.mkdir(parents=True, exist_ok=True)
    for name, row in rows.items():
        write_json(folder / f"{name}.json", row)
    for stale in folder.glob("*.json"):
        if stale.stem not in rows:
            stale.unlink()


def zoo_rows(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keep = ("role", "params_m", "val_acc", "train_seconds")
    return {m: {k: r[k] for k in keep if k in r} for m, r in metrics.items()}


def evaluate_rows(top1_err: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """A row per shard set, a column per model: top-1 error."""
    sets = dict.fromkeys(s for errors in top1_err.values() for s in errors)
    return {s: {m: errors[s] for m, errors in top1_err.items() if s in errors} for s in sets}


def adv_train_rows(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keep = ("method", "eps", "seed", "val_acc", "final_val_pgd_acc", "final_val_fgsm_acc", "white_box_val_acc")
    return {run: {**{k: m[k] for k in keep if k in m}, "co_events": len(m["co_events"])} for run, m in metrics.items()}


def ood_rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A row per method: ID accuracy and FPR95 per test set (means over seeds)."""
    return {name: {"id_acc": m["id_acc"]["mean"], **{f"fpr95 {s}": v["fpr95"]["mean"] for s, v in m["sets"].items()}}
            for name, m in metrics["methods"].items()}


def unlearn_rows(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """A row per scenario and method: the four unlearning metrics and the gap to retraining (means over seeds)."""
    keep = ("UA", "RA", "TA", "MIA", "avg_gap")
    return {f"{scenario}-{method}": {k: r.get(k) for k in keep}
            for scenario, rows in results.items() for method, r in rows.items()}


def optim_rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keep = ("val_acc", "clean", "aoa")
    return {name: {k: r[k] for k in keep if k in r} for group in ("optimizers", "lora") for name, r in
            metrics[group].items()}
