"""Stage ``unlearn``: every unlearning method in every forgetting scenario, against retraining from scratch.

Original model: a zoo model trained on the whole training split, or (``original``) one trained here on a seeded
subset without label smoothing or augmentation, so that it memorises its members as the MIA needs. Scenarios: a
seeded random share of that training set, or one whole class. Reference: the same architecture retrained from
scratch on the remaining data with the original's recipe. Each method starts from a copy of the original, once per
seed in ``seeds``; its metrics (UA, RA, TA, both MIA conventions, Avg Gap and KL/JS to the retrained model, run
time) go to one JSON, ``{scenario: {method: metrics}}``, as the mean over seeds with ``<metric>_std``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from common.files import write_json
from evaluators.claims import over_seeds
from evaluators.downstream_report import unlearning_section
from evaluators.unlearning import avg_gap, divergences, unlearning_metrics
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model, save_weights
from pipelines.config import Scenario, Unlearn, UnlearnMethod
from pipelines.flows import artifact_key
from pipelines.metric_tables import unlearn_rows, write_table
from pipelines.stages import DownstreamPaths
from sources.reading import load_split
from training.recipe import Recipe
from training.supervised import accuracy, train_classifier, write_curve
from training.unlearning import UnlearningData, create_method


def forget_indices(labels: torch.Tensor, scenario: Scenario, seed: int) -> torch.Tensor:
    """Sorted indices of the forget set: a seeded random share, or every sample of one class."""
    if scenario.kind == "random":
        n = round(scenario.fraction * len(labels))
        if not 0 < n < len(labels):
            raise ValueError(f"scenario {scenario}: fraction gives {n} of {len(labels)} samples")
        return torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    idx = torch.nonzero(labels == scenario.class_).flatten()
    if len(idx) == 0:
        raise ValueError(f"scenario {scenario}: no training sample of class {scenario.class_}")
    return idx


def split(x, y, xt, yt, scenario, seed):
    f = forget_indices(y, scenario, seed)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[f] = False
    test = torch.ones(len(yt), dtype=torch.bool)
    if scenario.kind == "class":  # TA on the classes the model should still know
        test = yt != scenario.class_
    return (x[f], y[f]), (x[keep], y[keep]), (xt[test], yt[test])


@task(name="unlearning-run", task_run_name="unlearn-{scenario}-{name}-seed{seed}", cache_policy=NO_CACHE)  # models and tensors are not cache keys
def unlearning_run(scenario: str, name: str, method_cfg: UnlearnMethod, original, data: UnlearningData, test,
                   reference: dict[str, Any], cfg: Unlearn, out: Path, seed: int) -> dict[str, Any]:
    model = copy.deepcopy(original)
    method = create_method(method_cfg.method or name, {**cfg.recipe, **method_cfg.recipe}, seed=seed)
    start = time.perf_counter()
    method.unlearn(model, data)
    seconds = time.perf_counter() - start
    save_weights(model, out / scenario / f"{name}-seed{seed}.safetensors")
    metrics, probs = unlearning_metrics(model, data.forget, data.remain, test, cfg.seed, cfg.mia_attack)
    metrics.update(avg_gap=avg_gap(metrics, reference["metrics"]), seconds=round(seconds, 1),
                   **divergences(reference["probs"], probs))
    get_run_logger().info("%s / %s / seed %d: %s", scenario, name, seed, metrics)
    return metrics


@flow(name="unlearn", flow_run_name="unlearn-{profile}-{spec.name}")
def unlearn_flow(cfg: Unlearn, spec: ModelSpec, original_recipe: Recipe,
                 paths: DownstreamPaths, profile: str = "demo") -> dict[str, Any]:
    log = get_run_logger()
    size = spec.image_size
    x, y, _ = load_split(cfg.train_root, size)
    xt, yt, _ = load_split(cfg.val_root, size)
    if cfg.original:  # trained here on a seeded subset, to memorise it (what a membership attack can see)
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
        x, y = x[pick[: cfg.original.train_images]], y[pick[: cfg.original.train_images]]
        original_recipe = cfg.original.recipe
        torch.manual_seed(cfg.seed)
        original = build_model(spec.replace(weights=None))
        info = train_classifier(original, x, y, original_recipe, seed=cfg.seed, desc="original",
                                epoch_end=lambda m: {"test_acc": accuracy(m, xt, yt), "train_acc": accuracy(m, x, y)})
        write_curve(paths.plots / "original.csv", info["history"], last="test_acc")
        save_weights(original, paths.out / "original.safetensors")
        log.info("original: %d training images, train acc %.1f%%, test acc %.1f%%", len(x),
                 info["history"][-1]["train_acc"], info["history"][-1]["test_acc"])
    else:
        original = build_model(spec)
    results: dict[str, dict[str, Any]] = {}
    for scenario, sc in cfg.scenarios.items():
        forget, remain, test = split(x, y, xt, yt, sc, cfg.seed)
        data = UnlearningData(forget, remain, spec.num_classes)
        log.info("%s: forget %d, remain %d, test %d", scenario, len(forget[0]), len(remain[0]), len(test[0]))
        torch.manual_seed(cfg.seed)
        retrained = build_model(spec.replace(weights=None))
        start = time.perf_counter()
        info = train_classifier(retrained, *remain, original_recipe, seed=cfg.seed, desc=f"retrain {scenario}",
                                epoch_end=lambda m, test=test, forget=forget: {"test_acc": accuracy(m, *test),
                                                                               "forget_acc": accuracy(m, *forget)})
        write_curve(paths.plots / f"retrain-{scenario}.csv", info["history"], last="forget_acc")
        seconds = time.perf_counter() - start
        save_weights(retrained, paths.out / scenario / "retrain.safetensors")
        ref_metrics, ref_probs = unlearning_metrics(retrained, forget, remain, test, cfg.seed, cfg.mia_attack)
        reference = {"metrics": ref_metrics, "probs": ref_probs}
        rows = {"retrain": {**ref_metrics, "avg_gap": 0.0, "seconds": round(seconds, 1), "KL": 0.0, "JS": 0.0}}
        orig_metrics, orig_probs = unlearning_metrics(original, forget, remain, test, cfg.seed, cfg.mia_attack)
        rows["original"] = {**orig_metrics, "avg_gap": avg_gap(orig_metrics, ref_metrics), "seconds": 0.0,
                            **divergences(ref_probs, orig_probs)}
        for name, method_cfg in cfg.methods.items():
            rows[name] = over_seeds([unlearning_run(scenario, name, method_cfg or UnlearnMethod(), original, data, test, reference,
                                                    cfg, paths.out, seed) for seed in cfg.seeds])
        results[scenario] = rows
    write_json(paths.metrics, results)
    write_table(paths.metrics, unlearn_rows(results))
    markdown = unlearning_section(results, cfg, paths.reports)
    create_markdown_artifact(key=artifact_key(profile, "unlearning"), markdown=markdown, description="Machine unlearning")
    return results
