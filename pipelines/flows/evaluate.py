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

from common.files import write_json
from evaluators.classification import evaluate_shardset, shardset_hash
from evaluators.success import success_rates
from model_zoo.spec import MissingModel, ModelSpec
from model_zoo.zoo import build_model, timm_model_name, weights_hash
from pipelines.config import Source
from pipelines.metric_tables import evaluate_rows, write_table


@task(name="evaluate-model", task_run_name="evaluate-{spec.name}")
def evaluate_model(spec: ModelSpec | MissingModel, sets: dict[str, str], cache_dir: str, batch_size: int, device: str,
                   workers: int) -> dict[str, Any]:
    """All shard sets for one model (the model is built once); cached results are reused."""
    if isinstance(spec, MissingModel):
        return {"name": spec.name, "error": spec.error}
    try:
        whash = weights_hash(spec)
        model = None
        results = {}
        for set_name, root in sets.items():
            cache = Path(cache_dir) / spec.name / f"{set_name}-{whash}-{shardset_hash(root)}.json"
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
        return {"name": spec.name, "arch": spec.arch, "timm_model": timm_model_name(spec), "weights_hash": whash,
                "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "img_size": cfg["input_size"][-1], "crop_pct": cfg.get("crop_pct"),
                "interpolation": cfg.get("interpolation"), "results": results}
    except Exception as e:  # noqa: BLE001  (one model's failure is reported, the others go on)
        return {"name": spec.name, "error": f"{type(e).__name__}: {e}"}


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


def evaluate(models: list[ModelSpec | MissingModel], sets: dict[str, str], out: str, *, batch_size: int = 256,
             devices: list[str] | None = None, workers: int = 0, metrics_path: str = "metrics/evaluate.json",
             source: Source | None = None, profile: str = "demo") -> dict[str, Any]:
    """Run :func:`evaluate_flow` with one worker per device (models are spread over the devices)."""
    runner = ThreadPoolTaskRunner(max_workers=len(devices or ["cpu"]))
    return evaluate_flow.with_options(task_runner=runner)(
        models, sets, out, batch_size=batch_size, devices=devices, workers=workers, metrics_path=metrics_path,
        source=source, profile=profile)


@flow(name="evaluate", flow_run_name="evaluate-{profile}")
def evaluate_flow(models: list[ModelSpec | MissingModel], sets: dict[str, str], out: str, batch_size: int = 256,
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
    success = _write_results(out_dir, ok, list(sets), source)
    summary = {r["name"]: {s: round(100 - v["top1"], 3) for s, v in r["results"].items()} for r in ok}
    write_json(metrics_path, {"top1_err": summary, "attack_success": success, "errors": errors})
    write_table(metrics_path, evaluate_rows(summary))
    return {"records": records, "top1_err": summary}


# timm's results CSVs (results-imagenet.csv; the other sets add the differences to it), then the architecture
TIMM_COLUMNS = ["model", "img_size", "top1", "top1_err", "top5", "top5_err", "param_count", "crop_pct",
                "interpolation"]
DIFF_COLUMNS = ["top1_diff", "top5_diff", "rank_diff"]
SUCCESS_COLUMNS = ["model", "attack_set", "asr_all", "asr_all_low", "asr_all_high", "asr_all_n", "asr_correct",
                   "asr_correct_low", "asr_correct_high", "asr_correct_n", "architecture"]


def _write_results(out: Path, records: list[dict], set_names: list[str], source: Source | None) -> dict:
    """Per set, a results CSV keyed and ordered like timm's (``model``: the zoo name, unique; ``architecture``: the
    timm model or architecture) and, where samples carry label sets, ``results-<set>-real.csv`` with ReaL top-1/top-5
    (timm's ``results-imagenet-real.csv``, its differences taken to the same set's single labels); the attack
    success rates of every attack set on every model (``success-rates.csv``, both conventions); one JSON record per
    model; per-sample predictions per (model, set). Returns the success rates, {model: {set: rates}}.

    ``img_size``, ``crop_pct`` and ``interpolation`` say how the images were actually made for each model: the
    prepare stage's crop (``source``; unknown when None), then, when the model's input size differs, one bicubic
    resize."""
    size, crop_pct, crop_filter = (source.size, source.crop_pct, source.filter) if source else (None, None, None)
    (out / "results").mkdir(parents=True, exist_ok=True)

    def row(r: dict, top1: float, top5: float) -> dict:
        resized = size not in (None, r["img_size"])
        return {"model": r["name"], "img_size": r["img_size"], "top1": top1, "top1_err": round(100 - top1, 3),
                "top5": top5, "top5_err": round(100 - top5, 3), "param_count": r["param_count"],
                "crop_pct": crop_pct, "interpolation": f"{crop_filter}+bicubic" if resized else crop_filter,
                "architecture": r["timm_model"] or r["arch"]}

    written = {"success-rates.csv"}
    for set_name in set_names:
        table = {r["name"]: row(r, r["results"][set_name]["top1"], r["results"][set_name]["top5"]) for r in records}
        reference = ({r["name"]: row(r, r["results"]["clean"]["top1"], r["results"]["clean"]["top5"])
                      for r in records} if set_name != "clean" and "clean" in set_names else None)
        _write_csv(out / "results" / f"results-{set_name}.csv", table, reference)
        written.add(f"results-{set_name}.csv")
        real = {r["name"]: _real_top(r["results"][set_name]["predictions"]) for r in records}
        if all(real.values()):  # the set's samples carry label sets
            _write_csv(out / "results" / f"results-{set_name}-real.csv",
                       {r["name"]: row(r, *real[r["name"]]) for r in records}, table)
            written.add(f"results-{set_name}-real.csv")
    success = ({r["name"]: {s: success_rates(r["results"]["clean"]["predictions"], r["results"][s]["predictions"])
                            for s in set_names if s != "clean"} for r in records} if "clean" in set_names else {})
    with open(out / "results" / "success-rates.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUCCESS_COLUMNS)
        writer.writeheader()
        for r in records:
            for s, rates in success.get(r["name"], {}).items():
                writer.writerow({"model": r["name"], "attack_set": s, "architecture": r["timm_model"] or r["arch"],
                                 **{k: rates[k] for k in ("asr_all", "asr_all_n", "asr_correct", "asr_correct_n")},
                                 **{f"{k}_{end}": (rates[f"{k}_ci"] or [None, None])[i]
                                    for k in ("asr_all", "asr_correct") for i, end in enumerate(("low", "high"))}})
    for stale in (out / "results").glob("*.csv"):  # a file of an earlier run (another set) is not this run's
        if stale.name not in written:
            stale.unlink()
    current = {r["name"] for r in records}
    for stale in (out / "models").glob("*.json"):  # a model no longer in the list: not this run's result
        if stale.stem not in current:
            stale.unlink()
            shutil.rmtree(out / "predictions" / stale.stem, ignore_errors=True)
    for r in records:
        record = {k: v for k, v in r.items() if k != "results"}
        record["accuracy"] = {s: {k: v[k] for k in ("top1", "top5", "n", "real_top1", "real_n")}
                              for s, v in r["results"].items()}
        record["success"] = success.get(r["name"], {})
        write_json(out / "models" / f"{r['name']}.json", record)
        for s, v in r["results"].items():
            pred_file = out / "predictions" / r["name"] / f"{s}.jsonl"
            pred_file.parent.mkdir(parents=True, exist_ok=True)
            pred_file.write_text("".join(json.dumps(p) + "\n" for p in v["predictions"]))
    return success


def _real_top(predictions: list[dict]) -> tuple[float, float] | None:
    """ReaL top-1 and top-5 (%) over the images with a non-empty label set: right when the top prediction (any of
    the top five) is in the set; None when no image has one."""
    scored = [p for p in predictions if p.get("label_set")]
    if not scored:
        return None
    return (round(100 * sum(p["top5"][0] in p["label_set"] for p in scored) / len(scored), 3),
            round(100 * sum(any(c in p["label_set"] for c in p["top5"]) for p in scored) / len(scored), 3))


def _write_csv(path: Path, table: dict[str, dict], reference: dict[str, dict] | None) -> None:
    """Rows by top-1, best first, as timm sorts them; with ``reference`` (the rows these differ from) timm's
    ``top1_diff``, ``top5_diff`` and signed ``rank_diff``."""
    order = sorted(table, key=lambda m: -table[m]["top1"])
    if reference is not None:
        before = {m: i for i, m in enumerate(sorted(reference, key=lambda m: -reference[m]["top1"]))}
        for i, m in enumerate(order):
            rank_diff = before[m] - i
            table[m].update(top1_diff=round(table[m]["top1"] - reference[m]["top1"], 3),
                            top5_diff=round(table[m]["top5"] - reference[m]["top5"], 3),
                            rank_diff=f"{rank_diff:+d}" if rank_diff else "0")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMM_COLUMNS + (DIFF_COLUMNS if reference else []) + ["architecture"])
        writer.writeheader()
        writer.writerows(table[m] for m in order)
