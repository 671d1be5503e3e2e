"""Stage ``zoo``: train the demo-world models from scratch (or check pretrained ones) and record val accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task

from model_zoo.training import Recipe, accuracy, train_classifier
from model_zoo.zoo import ModelSpec, build_model, save_weights
from pipelines.params import write_json
from sources.reading import load_split


def zoo_specs(zoo: dict[str, Any]) -> list[dict[str, Any]]:
    """Resolved specs of the zoo's models: models trained here point at their saved weights."""
    specs = []
    for m in zoo["models"]:
        spec = {k: v for k, v in m.items() if k != "recipe"}
        spec.setdefault("num_classes", zoo["num_classes"])
        spec.setdefault("data", {"input_size": [3, zoo["img_size"], zoo["img_size"]], "crop_pct": 1.0})
        if "recipe" in m:
            spec["weights"] = str(Path(zoo["out"]) / f"{m['name']}.safetensors")
        specs.append(spec)
    return specs


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
    recipes = {m["name"]: m.get("recipe") for m in zoo["models"]}
    specs = zoo_specs(zoo)
    for spec in specs:  # fail fast on unknown architectures or missing pretrained files, before any training
        if recipes[spec["name"]] is None:
            build_model(ModelSpec.from_dict(spec))
        else:
            build_model(ModelSpec.from_dict({**spec, "weights": None}))
    metrics = {}
    for spec in specs:
        if recipes[spec["name"]] is not None:
            metrics[spec["name"]] = train_zoo_model(spec, recipes[spec["name"]], zoo, strict)
    write_json(Path(zoo["out"]) / "models.json", specs)
    write_json(metrics_path, metrics)
    return metrics
