"""Stage ``evaluate``: every model on every shard set (clean and each attack), cached per model and shard set.

A result is cached under (model name, weights hash, shard-set hash), so adding a model evaluates only that model
and a retrained model or a regenerated set is evaluated again. A model that cannot be built or a set that cannot
be read is reported with its error; the other models still report.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from evaluators.classification import evaluate_shardset, shardset_hash
from model_zoo.zoo import build_model, timm_model_name, weights_hash
from pipelines.config import Source
from pipelines.metric_tables import evaluate_rows, write_table
from pipelines.params import write_json


@task(name="evaluate-model", task_run_name="evaluate-{spec[name]}")
def evaluate_model(spec: dict[str, Any], sets: dict[str, str], cache_dir: str, batch_size: int, device: str,
                   workers: int) -> dict[str, Any]:
    """All shard sets for one model (the model is built once); cached results are reused."""
    if "error" in spec:
        return {"name": spec["name"], "error": spec["error"]}
    try:
        whash = weights_hash(spec)
        model = None
        results = {}
        for set_name, root in sets.items():
            cache = Path(cache_dir) / spec["name"] / f"{set_name}-{whash}-{shardset_hash(root)}.json"
            cached = _read_cache(cache)
            if cached is not None:
                results[set_name] = cached | {"cached": True}
                continue
            model = model or build_model(spec, device=device)
            r = evaluate_shardset(model, root, batch_size, device, workers)
            write_json(cache, r, pretty=False)
            results[set_name] = r | {"cached": False}
        model = model or build_model(spec, device="cpu")
        cfg = model.data_config
        return {"name": spec["name"], "arch": spec["arch"], "timm_model": timm_model_name(spec), "weights_hash": whash,
                "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "img_size": cfg["input_size"][-1], "crop_pct": cfg.get("crop_pct"),
                "interpolation": cfg.get("interpolation"), "results": results}
    except Exception as e:  # noqa: BLE001  (one model's failure is reported, the others go on)
        return {"name": spec["name"], "error": f"{type(e).__name__}: {e}"}


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cached result, or None when there is none or it cannot be read (then it is computed again)."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        if isinstance(result, dict) and {"n", "top1", "top5", "real_n", "predictions"} <= set(result):
            return result
        problem = "not a result record"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    get_run_logger().warning("%s: unreadable cache entry (%s); evaluating again", path, problem)
    return None


def evaluate(**kwargs) -> dict[str, Any]:
    """Run the evaluate flow with one worker per device (models are spread over the devices)."""
    workers = len(kwargs.get("devices") or ["cpu"])
    return evaluate_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(**kwargs)


@flow(name="evaluate", flow_run_name="evaluate-{profile}")
def evaluate_flow(models: list[dict[str, Any]], sets: dict[str, str], out: str, batch_size: int = 256,
                  devices: list[str] | None = None, workers: int = 0,
                  metrics_path: str = "metrics/evaluate.json", source: Source | None = None,
                  profile: str = "demo") -> dict[str, Any]:
    """Every model on every set. ``source`` (the prepare stage's section: its crop size, share and filter) says how
    the shard images were made, for the results files. When any model fails the run fails (state Failed) and writes
    no results or metrics, so the previous ones stay; what the other models computed is in the cache for the
    next run."""
    log = get_run_logger()
    devices = devices or ["cpu"]
    out_dir = Path(out)
    futures = [evaluate_model.submit(spec, sets, str(out_dir / "cache"), batch_size, devices[i % len(devices)], workers)
               for i, spec in enumerate(models)]
    records = [f.result() for f in tqdm(futures, desc="evaluate", unit="model")]
    ok = [r for r in records if "error" not in r]
    for r in records:
        if "error" in r:
            log.error("model %s: %s", r["name"], r["error"])
        else:
            cached = sum(v["cached"] for v in r["results"].values())
            log.info("model %s: %d set(s) evaluated, %d from cache", r["name"], len(sets) - cached, cached)
    errors = {r["name"]: r["error"] for r in records if "error" in r}
    if errors:
        raise RuntimeError(f"evaluate: {len(errors)} model(s) failed; nothing written, the previous results stay "
                           "(the others' are cached): " + "; ".join(f"{n}: {e}" for n, e in errors.items()))
    _write_results(out_dir, ok, list(sets), source)
    summary = {r["name"]: {s: round(100 - v["top1"], 3) for s, v in r["results"].items()} for r in ok}
    write_json(metrics_path, {"top1_err": summary, "errors": errors})
    write_table(metrics_path, evaluate_rows(summary))
    return {"records": records, "top1_err": summary}


RESULTS_COLUMNS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                   "interpolation", "top1_diff", "top5_diff", "rank_diff",  # timm's columns
                   "real_top1", "real_top1_err", "name"]  # ReaL top-1 (timm: results-*-real.csv), the zoo name


def _write_results(out: Path, records: list[dict], set_names: list[str], source: Source | None) -> None:
    """timm-style results CSV per set (timm's columns, ReaL top-1 and this project's model name added), one JSON
    record per model, per-sample predictions per (model, set).

    ``img_size``, ``crop_pct`` and ``interpolation`` say how the images were actually made for each model: the
    prepare stage's crop (``source``; unknown when None), then, when the model's input size differs, one bicubic
    resize."""
    size, crop_pct, crop_filter = (source.size, source.crop_pct, source.filter) if source else (None, None, None)
    out.mkdir(parents=True, exist_ok=True)
    clean_rank = _ranks(records, "clean") if "clean" in set_names else {}
    for set_name in set_names:
        ranks = _ranks(records, set_name)
        rows = []
        for r in sorted(records, key=lambda r: -r["results"][set_name]["top1"]):
            res, clean = r["results"][set_name], r["results"].get("clean", r["results"][set_name])
            rank_diff = clean_rank.get(r["name"], 0) - ranks[r["name"]] if clean_rank else 0
            resized = size not in (None, r["img_size"])
            rows.append({
                # as timm's CSVs name it (architecture.tag) where it is a timm model; "name": this project's name
                "model": r["timm_model"] or r["name"], "name": r["name"], "top1": res["top1"], "top1_err": round(100 - res["top1"], 3),
                "top5": res["top5"], "top5_err": round(100 - res["top5"], 3),
                # against the label sets (empty where the set has none; timm writes these to results-*-real.csv)
                "real_top1": res["real_top1"],
                "real_top1_err": None if res["real_top1"] is None else round(100 - res["real_top1"], 3),
                "param_count": r["param_count"], "img_size": r["img_size"], "crop_pct": crop_pct,
                "interpolation": f"{crop_filter}+bicubic" if resized else crop_filter,
                "top1_diff": round(res["top1"] - clean["top1"], 3), "top5_diff": round(res["top5"] - clean["top5"], 3),
                "rank_diff": f"{rank_diff:+d}" if rank_diff else "0",  # signed, as timm writes it
            })
        (out / "results").mkdir(exist_ok=True)
        with open(out / "results" / f"results-{set_name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULTS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    current = {r["name"] for r in records}
    for stale in (out / "models").glob("*.json"):  # a model no longer in the list: not this run's result
        if stale.stem not in current:
            stale.unlink()
            shutil.rmtree(out / "predictions" / stale.stem, ignore_errors=True)
    for r in records:
        record = {k: v for k, v in r.items() if k != "results"}
        record["accuracy"] = {s: {k: v[k] for k in ("top1", "top5", "n", "real_top1", "real_n")}
                              for s, v in r["results"].items()}
        write_json(out / "models" / f"{r['name']}.json", record)
        for s, v in r["results"].items():
            pred_file = out / "predictions" / r["name"] / f"{s}.jsonl"
            pred_file.parent.mkdir(parents=True, exist_ok=True)
            pred_file.write_text("".join(json.dumps(p) + "\n" for p in v["predictions"]))


def _ranks(records: list[dict], set_name: str) -> dict[str, int]:
    order = sorted(records, key=lambda r: -r["results"][set_name]["top1"])
    return {r["name"]: i + 1 for i, r in enumerate(order)}
