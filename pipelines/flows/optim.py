"""Stage ``optim``: sharpness-aware optimisers against SGD, and LoRA against Flat-LoRA.

1. One zoo architecture trained from scratch with each optimiser of ``optimizers`` (same epochs and schedule).
2. The zoo model adapted with LoRA / Flat-LoRA adapters to a *shifted* copy of the demo world (blurred, low
   contrast, tinted), adapters merged back for evaluation.
Every model: val accuracy (the shifted val split for the adapted ones), and accuracy on the clean and AoA shard
sets (its change under AoA). Specs go to ``models.json`` so the evaluate stage measures them on every set.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from common.files import write_json
from evaluators.claims import over_seeds
from evaluators.classification import evaluate_shardset
from evaluators.downstream_report import optim_section
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model, save_weights
from pipelines.config import DomainShift, Optim
from pipelines.flows import artifact_key
from pipelines.metric_tables import optim_rows, write_table
from pipelines.stages import DownstreamPaths
from sources.reading import load_split
from training.flat_lora import FlatLoRANoise, add_lora, merge_lora
from training.recipe import Recipe
from training.supervised import accuracy, batch_starts, train_classifier, write_curve


def shift_images(images: torch.Tensor, shift: DomainShift) -> torch.Tensor:
    """The shifted domain: box blur, contrast scaled around a colour tint (uint8 in, uint8 out)."""
    contrast, blur, tint = shift.contrast, shift.blur, shift.tint
    x = images.float()
    if blur > 1:
        x = F.avg_pool2d(F.pad(x, [blur // 2] * 4, mode="replicate"), blur, stride=1)
    x = contrast * x + (1 - contrast) * torch.tensor(tint).view(1, 3, 1, 1)
    return x.round().clamp(0, 255).to(torch.uint8)


def shard_accuracy(model, sets: dict[str, str]) -> dict[str, float]:
    return {name: evaluate_shardset(model, root)["top1"] for name, root in sets.items()}


def noisy_labels(labels: torch.Tensor, share: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: a seeded ``share`` of the labels replaced by a uniformly random *other* class."""
    gen = torch.Generator().manual_seed(seed)
    flip = torch.randperm(len(labels), generator=gen)[: int(round(share * len(labels)))]
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + torch.randint(1, num_classes, (len(flip),), generator=gen)) % num_classes
    return noisy


@task(name="optimizer-run", task_run_name="optim-{name}-seed{seed}", cache_policy=NO_CACHE)
def optimizer_run(name: str, overrides: Recipe | None, cfg: Optim, spec: ModelSpec, data,
                  paths: DownstreamPaths, seed: int) -> dict[str, Any]:
    (x, y), (xv, yv) = data
    torch.manual_seed(seed)
    model = build_model(spec.replace(weights=None, name=name))
    info = train_classifier(model, x, y, cfg.recipe.updated(overrides), seed=seed, desc=f"{name} seed {seed}",
                            epoch_end=lambda m: {"val_acc": accuracy(m, xv, yv)})
    write_curve(paths.plots / f"{name}-seed{seed}.csv", info["history"], last="val_acc")
    weights = paths.out / f"{name}-seed{seed}.safetensors"
    save_weights(model, weights)
    return {"spec": spec.replace(name=f"opt-{name}-seed{seed}", weights=str(weights)),
            "val_acc": round(accuracy(model, xv, yv), 2), "train_acc": round(accuracy(model, x, y), 2),
            "train_seconds": round(info["train_seconds"], 1), **shard_accuracy(model, cfg.shard_sets)}


@task(name="lora-run", task_run_name="lora-{name}", cache_policy=NO_CACHE)
def lora_run(name: str, sigma: float, cfg: Optim, spec: ModelSpec, data,
             paths: DownstreamPaths) -> dict[str, Any]:
    (x, y), (xv, yv) = data
    lora = cfg.lora
    torch.manual_seed(cfg.seed)
    model = build_model(spec)  # the zoo weights: pretrained on the unshifted world
    layers = add_lora(model.model, lora.rank, lora.alpha)
    recipe = lora.recipe.updated(freeze_norm=True)  # only the adapters adapt: BN statistics stay
    steps = recipe.epochs * len(batch_starts(len(x), recipe.batch_size))
    noise = FlatLoRANoise(layers, sigma, steps, cfg.seed)
    info = train_classifier(model, x, y, recipe, seed=cfg.seed, desc=name, callback=noise,
                            epoch_end=lambda m: {"val_acc": accuracy(m, xv, yv)})
    write_curve(paths.plots / f"{name}.csv", info["history"], last="val_acc")
    merge_lora(model.model)
    weights = paths.out / f"{name}.safetensors"
    save_weights(model, weights)
    return {"spec": spec.replace(name=f"opt-{name}", weights=str(weights)), "val_acc": round(accuracy(model, xv, yv), 2),
            "train_seconds": round(info["train_seconds"], 1), "sigma": sigma,
            "trainable_params": sum(p.numel() for layer in layers for p in (layer.lora_A, layer.lora_B)),
            **shard_accuracy(model, cfg.shard_sets)}


@flow(name="optim", flow_run_name="optim-{profile}-{spec.name}")
def optim_flow(cfg: Optim, spec: ModelSpec, paths: DownstreamPaths, profile: str = "demo") -> dict[str, Any]:
    log = get_run_logger()
    size = spec.image_size
    x, y, _ = load_split(cfg.train_root, size)
    xv, yv, _ = load_split(cfg.val_root, size)
    start = time.perf_counter()
    y_train = noisy_labels(y, cfg.label_noise, spec.num_classes, cfg.seed) if cfg.label_noise else y
    if cfg.label_noise:
        log.info("label noise: %d of %d training labels replaced", int((y_train != y).sum()), len(y))
    runs = {n: [optimizer_run(n, o, cfg, spec, ((x, y_train), (xv, yv)), paths, seed)
                for seed in cfg.seeds] for n, o in cfg.optimizers.items()}
    optimizers = {n: over_seeds(r) for n, r in runs.items()}
    lora = cfg.lora
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: lora.train_images]
    shifted = ((shift_images(x[pick], lora.shift), y[pick]), (shift_images(xv, lora.shift), yv))
    base = build_model(spec)
    base_shifted = round(accuracy(base, *shifted[1]), 2)
    log.info("zoo model %s on the shifted val split: %.1f%% (unshifted: %.1f%%)", spec.name, base_shifted,
             accuracy(base, xv, yv))
    adapters = {n: lora_run(n, r.sigma, cfg, spec, shifted, paths) for n, r in lora.runs.items()}
    specs = [r["spec"] for per_seed in runs.values() for r in per_seed] + [r["spec"] for r in adapters.values()]
    write_json(paths.out / "models.json", [spec.to_json() for spec in specs])
    metrics = {"optimizers": optimizers, "seeds": cfg.seeds, "label_noise": cfg.label_noise,
               "lora": {n: {k: v for k, v in r.items() if k != "spec"} for n, r in adapters.items()},
               "lora_base_shifted_val_acc": base_shifted, "seconds": round(time.perf_counter() - start, 1)}
    write_json(paths.metrics, metrics)
    write_table(paths.metrics, optim_rows(metrics))
    markdown = optim_section(metrics, cfg, paths.reports)
    create_markdown_artifact(key=artifact_key(profile, "optimisers"), markdown=markdown, description="SAM / F-SAM / Flat-LoRA")
    return metrics
