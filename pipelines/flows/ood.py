"""Stage ``ood``: OOD fine-tuning (OE, Energy-OE, OrthLoss) from one base classifier, scored on several OOD sets.

In-distribution: the ``id_classes`` of the training/validation splits (relabelled 0..K-1). Auxiliary outliers
(used in training): other classes of the training split plus image folders. Test OOD sets (never trained on):
held-out classes of the validation split, other image folders, and adversarial shards (``are DAmageNet images
detected as OOD?``: their images of ID classes). Base: trained here on the ID classes (``pretrain``; the demo
zoo models have seen every class) or the zoo weights as they are.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from common.files import write_json
from evaluators.downstream_report import ood_section
from evaluators.ood import POSITIVE, ood_metrics
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model, save_weights
from pipelines.config import MarginSearch, Ood, OodMethod
from pipelines.flows import artifact_key
from pipelines.metric_tables import ood_rows, write_table
from pipelines.stages import DownstreamPaths
from sources.reading import load_image_folder, load_split
from training.data import shard_images
from training.ood import SCORES, create_method
from training.ood.features import class_weights, features_and_logits
from training.recipe import Recipe
from training.supervised import accuracy, batch_starts, train_classifier, write_curve


def select_classes(images, labels, classes: list[int] | None, relabel: bool = True):
    """The samples of ``classes`` (all when None), labels mapped to their position in ``classes``."""
    if classes is None:
        return images, labels
    keep = torch.isin(labels, torch.tensor(classes))
    mapping = {c: i for i, c in enumerate(classes)}
    return images[keep], torch.tensor([mapping[int(v)] for v in labels[keep]]) if relabel else labels[keep]


def load_ood_data(cfg: Ood, size: int) -> dict[str, Any]:
    x, y, _ = load_split(cfg.train_root, size)
    xv, yv, _ = load_split(cfg.val_root, size)
    aux = cfg.aux_outliers
    outliers = [select_classes(x, y, aux.classes, relabel=False)[0]] if aux.classes else []
    outliers += [load_image_folder(f, size) for f in aux.folders]
    tests = {}
    for name, t in cfg.test_ood.items():  # the schema makes each give exactly one source
        if t.classes is not None:
            tests[name] = select_classes(xv, yv, t.classes, relabel=False)[0]
        elif t.folder is not None:
            tests[name] = load_image_folder(t.folder, size)
        else:
            images, labels = shard_images([t.shards])
            tests[name] = select_classes(images, labels, cfg.id_classes, relabel=False)[0]
    return {"train": select_classes(x, y, cfg.id_classes), "id_test": select_classes(xv, yv, cfg.id_classes),
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


def fine_tune(model, method, data: dict[str, Any], recipe: Recipe, seed: int) -> dict[str, Any]:
    """Train ``model`` with ``method``'s loss: every step pairs the ID batch with a fresh outlier batch. Returns the
    training summary, with ID test accuracy per epoch in its history."""
    outliers = data["outliers"]
    gen = torch.Generator().manual_seed(seed + 1)
    batch = {"x_out": None}

    def next_outliers():
        idx = torch.randint(0, len(outliers), (recipe.batch_size,), generator=gen)
        batch["x_out"] = outliers[idx].float().div(255)

    steps_total = recipe.epochs * len(batch_starts(len(data["train"][0]), recipe.batch_size))

    def after_step(step, m, opt):
        method.progress = step / steps_total
        next_outliers()

    next_outliers()
    method.progress = 0.0
    return train_classifier(model, *data["train"], recipe, seed=seed, desc=method.name,
                            objective=lambda m, x, y: method.loss(m, x, y, batch["x_out"]), callback=after_step,
                            epoch_end=lambda m: {"id_acc": accuracy(m, *data["id_test"])})


def energy_margin_search(base, data, search: MarginSearch, recipe: Recipe, seed: int) -> dict[str, Any]:
    """Energy-OE's margins chosen on validation data, as the paper chose them (its CIFAR values, -25 / -7, sit far
    from another model's energies). Candidates are offsets from the base model's median ID training energy; each
    fine-tunes on 80% of the ID training set and of the auxiliary outliers and is scored by energy FPR95 on the
    held-out 20% of each (never on a test OOD set). Returns the chosen margins and every candidate's score; the
    final runs then train on all the data with them."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data["train"]
    order, out_order = torch.randperm(len(x), generator=gen), torch.randperm(len(data["outliers"]), generator=gen)
    cut, out_cut = int(0.8 * len(x)), int(0.8 * len(out_order))
    fit = {**data, "train": (x[order[:cut]], y[order[:cut]]), "outliers": data["outliers"][out_order[:out_cut]]}
    energy_id, _ = all_scores(base, x[order[:cut]])
    median = float(np.median(-energy_id["energy"]))  # the energy score is -E
    table = []
    for d_in in search.m_in:
        for d_out in search.m_out:
            m_in, m_out = round(median + d_in, 3), round(median + d_out, 3)
            model = copy.deepcopy(base)
            fine_tune(model, create_method("energy-oe", m_in=m_in, m_out=m_out), fit, recipe, seed)
            val_id, _ = all_scores(model, x[order[cut:]])
            val_out, _ = all_scores(model, data["outliers"][out_order[out_cut:]])
            table.append({"m_in": m_in, "m_out": m_out, **ood_metrics(val_id["energy"], val_out["energy"])})
    best = min(table, key=lambda r: (r["fpr95"], -r["auroc"]))
    return {"m_in": best["m_in"], "m_out": best["m_out"], "median_id_energy": round(median, 3), "candidates": table}


@task(name="ood-fine-tune", task_run_name="ood-{name}-seed{seed}", cache_policy=NO_CACHE)  # models, tensors: no keys
def ood_run(name: str, method_cfg: OodMethod | None, base, data, cfg: Ood, paths: DownstreamPaths,
            seed: int) -> dict[str, Any]:
    """Fine-tune ``base`` with one method (None: the baseline, not trained) and evaluate it as a detector."""
    model = copy.deepcopy(base)
    seconds, options = 0.0, {}
    if method_cfg is not None:
        recipe = cfg.recipe.updated(method_cfg.recipe)
        options = dict(method_cfg.options)
        method = create_method(method_cfg.method, **options)
        info = fine_tune(model, method, data, recipe, seed)
        write_curve(paths.plots / f"{name}-seed{seed}.csv", info["history"], last="id_acc")
        seconds = info["train_seconds"]
        score = method.score
    else:
        score = "msp"
    if seed == cfg.seeds[0]:
        save_weights(model, paths.out / f"{name}.safetensors")
    result = evaluate_detector(model, data)
    get_run_logger().info("%s seed %d (%s score): ID acc %.1f; %s", name, seed, score, result["id_acc"],
                          ", ".join(f"{s}: FPR95 {v[score]['fpr95']:.1f} AUROC {v[score]['auroc']:.1f}"
                                    for s, v in result["sets"].items()))
    return {**result, "score": score, "train_seconds": round(seconds, 1), "options": options}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 2), "std": round(float(np.std(values, ddof=1)), 2)
            if len(values) > 1 else 0.0}


def aggregate_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's runs over seeds: every metric as mean and sample std (ddof 1), for its own score."""
    score = runs[0]["score"]
    sets = {s: {k: mean_std([r["sets"][s][score][k] for r in runs]) for k in runs[0]["sets"][s][score]}
            for s in runs[0]["sets"]}
    return {"score": score, "id_acc": mean_std([r["id_acc"] for r in runs]), "sets": sets, "seeds": len(runs),
            "train_seconds": round(sum(r["train_seconds"] for r in runs), 1),
            "options": runs[0]["options"], "per_seed": [{s: v[score] for s, v in r["sets"].items()} for r in runs],
            "all_scores_first_seed": runs[0]["sets"]}


@flow(name="ood", flow_run_name="ood-{profile}-{spec.name}")
def ood_flow(cfg: Ood, spec: ModelSpec, paths: DownstreamPaths, profile: str = "demo") -> dict[str, Any]:
    log = get_run_logger()
    size = spec.image_size
    data = load_ood_data(cfg, size)
    log.info("ID: %d train / %d test images of %s classes; %d auxiliary outliers; test OOD sets: %s",
             len(data["train"][0]), len(data["id_test"][0]), cfg.id_classes or "all", len(data["outliers"]),
             {k: len(v) for k, v in data["tests"].items()})
    torch.manual_seed(cfg.seed)
    num_classes = len(cfg.id_classes) if cfg.id_classes else spec.num_classes
    if cfg.pretrain:
        base = build_model(spec.replace(weights=None, num_classes=num_classes))
        info = train_classifier(base, *data["train"], cfg.pretrain, seed=cfg.seed, desc="ID base",
                                epoch_end=lambda m: {"id_acc": accuracy(m, *data["id_test"])})
        write_curve(paths.plots / "id-base.csv", info["history"], last="id_acc")
    else:
        base = build_model(spec)
    runs = {"baseline": None, **cfg.methods}
    searches = {}
    for name, m in cfg.methods.items():  # margins searched once (first seed), then every seed trains with them
        if m.search:
            searches[name] = energy_margin_search(base, data, m.search, cfg.recipe.updated(m.recipe), cfg.seeds[0])
            runs[name] = m.model_copy(update={"options": {**m.options, "m_in": searches[name]["m_in"],
                                                          "m_out": searches[name]["m_out"]}})
            log.info("%s: margins m_in %.2f, m_out %.2f chosen on validation data", name, searches[name]["m_in"],
                     searches[name]["m_out"])
    results = {name: [ood_run(name, m, base, data, cfg, paths, seed) for seed in (cfg.seeds if m else cfg.seeds[:1])]
               for name, m in runs.items()}  # the baseline is not trained: one evaluation
    metrics = {"positive": POSITIVE, "seeds": cfg.seeds,
               "methods": {name: aggregate_seeds(r) for name, r in results.items()}, "margin_search": searches}
    write_json(paths.metrics, metrics)
    write_table(paths.metrics, ood_rows(metrics))
    markdown = ood_section(metrics, {n: r[0]["scores"] for n, r in results.items()}, cfg.id_classes, paths.reports)
    create_markdown_artifact(key=artifact_key(profile, "ood-fine-tuning"), markdown=markdown, description="OOD fine-tuning")
    return metrics
