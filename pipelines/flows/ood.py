"""Stage ``ood``: OOD fine-tuning (OE, Energy-OE, OrthLoss) from one base classifier, scored on several OOD sets.

In-distribution: the ``id_classes`` of the training/validation splits (relabelled 0..K-1). Auxiliary outliers
(used in training): other classes of the training split plus image folders. Test OOD sets (never trained on):
held-out classes of the validation split, other image folders, and adversarial shards (``are DAmageNet images
detected as OOD?``: their images of ID classes). Base: trained here on the ID classes (``pretrain``; the demo
zoo models have seen every class) or the zoo weights as they are.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from evaluators.downstream_report import ood_section
from evaluators.ood import POSITIVE, ood_metrics
from model_zoo.training import Recipe, train_classifier
from model_zoo.zoo import build_model, save_weights
from pipelines.params import write_json
from sources.reading import load_image_folder, load_split
from training.data import shard_images
from training.ood import SCORES, create_method
from training.ood.features import class_weights, features_and_logits


def select_classes(images, labels, classes: list[int] | None, relabel: bool = True):
    """The samples of ``classes`` (all when None), labels mapped to their position in ``classes``."""
    if classes is None:
        return images, labels
    keep = torch.isin(labels, torch.tensor(classes))
    mapping = {c: i for i, c in enumerate(classes)}
    return images[keep], torch.tensor([mapping[int(v)] for v in labels[keep]]) if relabel else labels[keep]


def load_ood_data(cfg: dict[str, Any], size: int) -> dict[str, Any]:
    x, y, _ = load_split(cfg["train_root"], size)
    xv, yv, _ = load_split(cfg["val_root"], size)
    aux = cfg["aux_outliers"]
    outliers = [select_classes(x, y, aux.get("classes"), relabel=False)[0]] if aux.get("classes") else []
    outliers += [load_image_folder(f, size) for f in aux.get("folders", [])]
    tests = {}
    for name, t in cfg["test_ood"].items():
        if "classes" in t:
            tests[name] = select_classes(xv, yv, t["classes"], relabel=False)[0]
        elif "folder" in t:
            tests[name] = load_image_folder(t["folder"], size)
        elif "shards" in t:
            images, labels = shard_images([t["shards"]])
            tests[name] = select_classes(images, labels, cfg["id_classes"], relabel=False)[0]
        else:
            raise ValueError(f"params ood.test_ood.{name}: give one of classes, folder, shards")
    return {"train": select_classes(x, y, cfg["id_classes"]), "id_test": select_classes(xv, yv, cfg["id_classes"]),
            "outliers": torch.cat(outliers), "tests": tests}


@torch.no_grad()
def all_scores(model, images: torch.Tensor, batch_size: int = 256) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Every score of every image, and the predicted classes."""
    model.eval()
    w = class_weights(model)
    scores, preds = {k: [] for k in SCORES}, []
    for i in range(0, len(images), batch_size):
        feats, logits = features_and_logits(model, images[i : i + batch_size].float().div(255))
        for k, fn in SCORES.items():
            scores[k].append(fn(logits, feats, w))
        preds.append(logits.argmax(1))
    return {k: torch.cat(v).numpy() for k, v in scores.items()}, torch.cat(preds)


def evaluate_detector(model, data: dict[str, Any]) -> dict[str, Any]:
    x_id, y_id = data["id_test"]
    id_scores, preds = all_scores(model, x_id)
    result = {"id_acc": round(100 * (preds == y_id).float().mean().item(), 2), "sets": {}, "scores": {}}
    for name, images in data["tests"].items():
        ood_scores, _ = all_scores(model, images)
        result["sets"][name] = {k: ood_metrics(id_scores[k], ood_scores[k]) for k in SCORES}
        result["scores"][name] = {k: ood_scores[k] for k in SCORES}
    result["scores"]["id"] = id_scores
    return result


def fine_tune(model, method, data: dict[str, Any], recipe: Recipe, seed: int) -> float:
    """Train ``model`` with ``method``'s loss: every step pairs the ID batch with a fresh outlier batch."""
    outliers = data["outliers"]
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {"x_out": None}

    def next_outliers():
        idx = torch.randint(0, len(outliers), (recipe.batch_size,), generator=gen)
        batch["x_out"] = outliers[idx].float().div(255)

    steps_total = recipe.epochs * -(-len(data["train"][0]) // recipe.batch_size)

    def after_step(step, m, opt):
        method.progress = step / steps_total
        next_outliers()

    next_outliers()
    method.progress = 0.0
    start = time.perf_counter()
    train_classifier(model, *data["train"], recipe, seed=seed, desc=method.name,
                     objective=lambda m, x, y: method.loss(m, x, y, batch["x_out"]), callback=after_step)
    return time.perf_counter() - start


@task(name="ood-fine-tune", task_run_name="ood-{name}", cache_policy=NO_CACHE)  # models and tensors are not cache keys
def ood_run(name: str, method_cfg: dict[str, Any] | None, base, data, cfg) -> dict[str, Any]:
    model = copy.deepcopy(base)
    seconds = 0.0
    if method_cfg is not None:
        method = create_method(method_cfg["method"], **method_cfg.get("options", {}))
        seconds = fine_tune(model, method, data, Recipe(**{**cfg["recipe"], **method_cfg.get("recipe", {})}), cfg["seed"])
        score = method.score
    else:
        score = "msp"
    save_weights(model, Path(cfg["out"]) / f"{name}.safetensors")
    result = evaluate_detector(model, data)
    get_run_logger().info("%s (%s score): ID acc %.1f; %s", name, score, result["id_acc"],
                          ", ".join(f"{s}: FPR95 {v[score]['fpr95']:.1f} AUROC {v[score]['auroc']:.1f}"
                                    for s, v in result["sets"].items()))
    return {**result, "score": score, "train_seconds": round(seconds, 1)}


@flow(name="ood", flow_run_name="ood-{spec[name]}")
def ood_flow(cfg: dict[str, Any], spec: dict[str, Any], metrics_path: str = "metrics/ood.json",
             report_dir: str = "reports") -> dict[str, Any]:
    log = get_run_logger()
    size = spec["data"]["input_size"][-1]
    data = load_ood_data(cfg, size)
    log.info("ID: %d train / %d test images of %s classes; %d auxiliary outliers; test OOD sets: %s",
             len(data["train"][0]), len(data["id_test"][0]), cfg["id_classes"] or "all", len(data["outliers"]),
             {k: len(v) for k, v in data["tests"].items()})
    torch.manual_seed(cfg["seed"])
    num_classes = len(cfg["id_classes"]) if cfg["id_classes"] else spec["num_classes"]
    if cfg.get("pretrain"):
        base = build_model({**spec, "weights": None, "num_classes": num_classes})
        train_classifier(base, *data["train"], Recipe(**cfg["pretrain"]), seed=cfg["seed"], desc="ID base")
    else:
        base = build_model(spec)
    runs = {"baseline": None, **cfg["methods"]}
    results = {name: ood_run(name, m, base, data, cfg) for name, m in runs.items()}
    metrics = {"positive": POSITIVE, "methods": {
        name: {"score": r["score"], "id_acc": r["id_acc"], "train_seconds": r["train_seconds"],
               "sets": {s: v[r["score"]] for s, v in r["sets"].items()}, "all_scores": r["sets"]}
        for name, r in results.items()}}
    write_json(metrics_path, metrics)
    markdown = ood_section(metrics, {n: r["scores"] for n, r in results.items()}, cfg, Path(report_dir))
    create_markdown_artifact(key="ood-fine-tuning", markdown=markdown, description="OOD fine-tuning")
    return metrics
