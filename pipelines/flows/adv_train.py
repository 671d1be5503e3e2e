"""Stage ``adv-train``: adversarial training runs watched for catastrophic overfitting (CO).

Each run trains a zoo architecture from scratch with one method (FGSM, FGSM-RS, N-FGSM, GradAlign, PGD-AT),
optionally with DAmageNet shards mixed into the training set. A ``COMonitor`` checks robustness and the
self-fitting proxies every ``monitor.every`` steps, flags CO, raises a Prefect artifact and (``response:
rollback``) restores the most robust checkpoint, on which the run also ends if it does not recover.
Outputs: checkpoints and their specs (``models.json``, which the evaluate stage reads, so the trained models are
measured on the clean/AoA/PGD shard sets), per-check curves (DVC plots), metrics JSON, and the report section with
the curves and every CO event marked.
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from common.files import write_json
from evaluators.downstream_report import adv_training_section
from evaluators.white_box import pgd_robust_accuracy
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model, save_weights
from pipelines.config import AdvRun, AdvTrain
from pipelines.flows import artifact_key
from pipelines.metric_tables import adv_train_rows, write_table
from pipelines.stages import DownstreamPaths
from sources.reading import load_split
from training.adversarial import create_method
from training.adversarial.monitors import CODetector, COMonitor, early_conv_layers
from training.data import shard_images
from training.supervised import accuracy, train_classifier, write_curve


def fixed_subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx].float().div(255), labels[idx]


@task(name="adversarial-training-run", task_run_name="adv-train-{name}", cache_policy=NO_CACHE)  # tensors are not cache keys
def adversarial_training_run(name: str, run: AdvRun, cfg: AdvTrain, spec: ModelSpec, data,
                             paths: DownstreamPaths, profile: str) -> dict[str, Any]:
    log = get_run_logger()
    (x, y), (xv, yv) = data
    seed = cfg.seed if run.seed is None else run.seed  # a run may repeat another with its own seed (init, batches, attack noise)
    torch.manual_seed(seed)
    model = build_model(spec.replace(weights=None, name=name))
    eps = run.eps / 255
    alpha = run.step / 255 if run.step is not None else None  # None: the method's default step
    method = create_method(run.method, eps=eps, alpha=alpha, seed=seed, **run.options)
    mon = cfg.monitor

    def alert(event: dict[str, Any]) -> None:
        log.warning("%s: catastrophic overfitting at step %d: PGD acc %.1f (peak) -> %.1f, FGSM acc %.1f -> %.1f (%s)",
                    name, event["step"], event["pgd_acc_peak"], event["pgd_acc"], event["fgsm_acc_at_peak"],
                    event["fgsm_acc"], event["response"])
        create_markdown_artifact(
            key=artifact_key(profile, f"co-event-{name}"),
            markdown=f"**Catastrophic overfitting** in `{name}` ({method}) at step {event['step']}: PGD accuracy "
                     f"{event['pgd_acc_peak']:.1f} (peak) -> {event['pgd_acc']:.1f}, FGSM accuracy "
                     f"{event['fgsm_acc_at_peak']:.1f} -> {event['fgsm_acc']:.1f}; response: {event['response']}.",
            description=f"CO alert: {name}")

    monitor = COMonitor(
        method=method, eps=eps, every=mon.every, pgd_steps=mon.pgd_steps,
        detector=CODetector(drop=mon.drop, min_drop=mon.min_drop, min_peak=mon.min_peak),
        response=run.response or mon.response, step_factor=mon.step_factor,
        train_batch=fixed_subset(x, y, mon.n, seed), val_batch=fixed_subset(xv, yv, mon.n, seed + 1),
        layers=mon.layers or early_conv_layers(model, 2), on_event=alert)
    recipe = cfg.recipe.updated(run.recipe)
    log.info("%s: %s, %d epochs of %d images", name, method, recipe.epochs, len(x))
    info = train_classifier(model, x, y, recipe, seed=seed, desc=name, objective=method.loss, callback=monitor)
    kept = monitor.keep_robust(model)
    if kept is not None:
        log.info("%s: ends on the weights of step %d, its most robust check before the collapse", name, kept)
    weights = paths.out / "models" / f"{name}.safetensors"
    save_weights(model, weights)
    write_curve(paths.plots / f"{name}.csv", monitor.history, last="train_pgd_acc")
    last = next(r for r in monitor.history if r["step"] == kept) if kept is not None else monitor.history[-1]
    white_box = {}
    if fe := cfg.final_eval:  # the white-box number of record, at the run's own eps: the val split or a random subset
        n = min(fe.n or len(xv), len(xv))
        white_box = {"white_box_val_acc": round(pgd_robust_accuracy(
            model, *fixed_subset(xv, yv, n, seed + 2), eps, steps=fe.pgd_steps, restarts=fe.restarts,
            seed=seed, desc=f"{name}: PGD-{fe.pgd_steps} x{fe.restarts}"), 2)}
        log.info("%s: white-box PGD-%d x%d accuracy on %d val images: %.2f", name, fe.pgd_steps, fe.restarts,
                 n, white_box["white_box_val_acc"])
    return {
        "spec": spec.replace(name=f"at-{name}", weights=str(weights)),
        "metrics": {
            "method": run.method, "eps": run.eps, "seed": seed, "val_acc": round(accuracy(model, xv, yv), 2),
            "final_val_pgd_acc": round(last["val_pgd_acc"], 2), "final_val_fgsm_acc": round(last["val_fgsm_acc"], 2),
            **white_box, **({"kept_step": kept} if kept is not None else {}),
            "co_events": monitor.events, "train_seconds": round(info["train_seconds"], 1),
        },
        "history": monitor.history,
    }


@flow(name="adv-train", flow_run_name="adv-train-{profile}-{spec.name}")
def adv_train_flow(cfg: AdvTrain, spec: ModelSpec, paths: DownstreamPaths, profile: str = "demo") -> dict[str, Any]:
    size = spec.image_size
    x, y, _ = load_split(cfg.train_root, size)
    xv, yv, _ = load_split(cfg.val_root, size)
    if cfg.mix_shards:
        xs, ys = shard_images(cfg.mix_shards)
        get_run_logger().info("%d DAmageNet images mixed into %d training images", len(xs), len(x))
        x, y = torch.cat([x, xs]), torch.cat([y, ys])
    data = ((x, y), (xv, yv))  # loaded once, shared by every run
    results = {name: adversarial_training_run(name, run, cfg, spec, data, paths, profile)
               for name, run in cfg.runs.items()}
    write_json(paths.out / "models.json", [r["spec"].to_json() for r in results.values()])
    metrics = {name: r["metrics"] for name, r in results.items()}
    write_json(paths.metrics, metrics)
    write_table(paths.metrics, adv_train_rows(metrics))
    markdown = adv_training_section(metrics, {n: r["history"] for n, r in results.items()}, cfg.monitor, cfg.final_eval,
                                    paths.reports,
                                    chance=100 / spec.num_classes)
    create_markdown_artifact(key=artifact_key(profile, "adversarial-training"), markdown=markdown,
                             description="Adversarial training and CO")
    return metrics
