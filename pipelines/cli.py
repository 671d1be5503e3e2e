"""``damagenet``: one entry point, one subcommand per pipeline stage (each runs that stage's Prefect flow).

DVC calls these (see dvc.yaml); every knob comes from params.yaml.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import pipelines  # noqa: F401  (environment defaults before Prefect is imported)
from attacks.registry import attack_method
from model_zoo import ZooError
from pipelines.config import ConfigError
from pipelines.params import load_params, metrics_dir, section
from pipelines.reproducible import NotReproducibleHere, pin_cpu
from sources import BadSourceError


def _world_root(params: dict, world: str, path: str) -> str:
    if world not in params["worlds"]:
        raise ConfigError(f"{path}: 'worlds' has no entry {world!r} (the folder to write it to)")
    return params["worlds"][world]


def _demo_data(args, params):
    from pipelines.flows.demo_data import demo_data_flow

    demo_data_flow(_world_root(params, "demo", args.params), **section(params, "demo_world", args.params))


def _real_data(args, params):
    from pipelines.flows.real_data import real_data_flow

    real_data_flow(_world_root(params, "real", args.params), **section(params, "real_world", args.params))


# the hub-weights record: the snapshot and sha256 of every hub model (dvc.yaml's hub_weights stage writes it)
HUB_WEIGHTS = Path("data/hub_weights.json")


def _hub_weights(args, params):
    from pipelines.flows.zoo import hub_weights_flow

    hub_weights_flow(section(params, "zoo", args.params), str(HUB_WEIGHTS), profile=params["profile"])


def _zoo(args, params):
    from pipelines.flows.zoo import zoo_flow

    hub = json.loads(HUB_WEIGHTS.read_text()) if HUB_WEIGHTS.is_file() else None
    zoo_flow(section(params, "zoo", args.params), metrics_path=str(args.metrics / "zoo.json"), strict=args.strict,
             hub=hub, profile=params["profile"])


def _prepare(args, params):
    from pipelines.flows.prepare import prepare_flow

    prepare_flow(section(params, "source", args.params), metrics_path=str(args.metrics / "prepare.json"),
                 strict=args.strict)


def surrogate_spec(params: dict, name: str) -> dict:
    """The resolved zoo spec of ``name`` (written by the zoo stage)."""
    models_file = Path(section(params, "zoo")["out"]) / "models.json"
    if not models_file.is_file():
        raise FileNotFoundError(f"{models_file}: not found (run the zoo stage first)")
    specs = {s["name"]: s for s in json.loads(models_file.read_text())}
    if name not in specs:
        raise KeyError(f"{models_file}: no model named {name!r} (have: {', '.join(specs)})")
    return specs[name]


def _generate(args, params):
    from pipelines.flows.generate import generate

    gen, attacks = section(params, "generate", args.params), section(params, "attacks", args.params)
    if args.attack not in attacks:
        raise SystemExit(f"{args.params}: attack {args.attack!r} has no entry under 'attacks' (have: {', '.join(attacks)})")
    options = {k: v for k, v in (attacks[args.attack] or {}).items() if k != "attack"}
    generate(
        attack=args.attack,
        method=attack_method(args.attack, attacks[args.attack]),
        budget=section(params, "budget", args.params),
        options={**options, "sub_batch": gen["sub_batch"]},  # memory: a generate parameter
        surrogate=surrogate_spec(params, gen["surrogate"]),
        clean_dir=section(params, "source", args.params)["out"],
        out_dir=str(Path(gen["out_root"]) / args.attack),
        batch_size=gen["batch_size"],
        devices=gen["devices"],
        cpu_workers=gen["cpu_workers"],
        # the switch fixes the threads unless the params give a number themselves (auto follows the core count)
        cpu_threads=(params["reproducible"] or {}).get("threads", "auto") if gen["cpu_threads"] == "auto"
        else gen["cpu_threads"],
        seed=gen["seed"],
        dask=gen.get("dask"),
        metrics_path=str(args.metrics / "generate" / f"{args.attack}.json"),
    )


def zoo_spec(params: dict, name: str) -> dict:
    """The zoo spec of ``name`` as the zoo stage resolves it (architecture and data config; no weights needed)."""
    from pipelines.flows.zoo import zoo_specs

    specs = {s["name"]: s for s in zoo_specs(section(params, "zoo"))}
    if name not in specs:
        raise SystemExit(f"params.yaml: no zoo model named {name!r} (have: {', '.join(specs)})")
    return specs[name]


# where the downstream stages write, as dvc.yaml declares it
DOWNSTREAM_OUT, DOWNSTREAM_REPORTS, DOWNSTREAM_PLOTS = (Path("data/downstream"), Path("reports/downstream"),
                                                         Path("plots/downstream"))


def _downstream(args, params, stage: str) -> tuple[dict, dict]:
    """A downstream stage's section with its output folder, and the flow's metrics, report and curve paths."""
    cfg = {**section(params, stage, args.params), "out": str(DOWNSTREAM_OUT / stage)}
    return cfg, {"metrics_path": str(args.metrics / "downstream" / f"{stage}.json"),
                 "report_dir": str(DOWNSTREAM_REPORTS), "plots_dir": str(DOWNSTREAM_PLOTS / stage)}


def _adv_train(args, params):
    from pipelines.flows.adv_train import adv_train_flow

    cfg, paths = _downstream(args, params, "adv_train")
    adv_train_flow(cfg, zoo_spec(params, cfg["model"]), **paths)


def _ood(args, params):
    from pipelines.flows.ood import ood_flow

    cfg, paths = _downstream(args, params, "ood")
    ood_flow(cfg, zoo_spec(params, cfg["model"]), **paths)


def _unlearn(args, params):
    from pipelines.flows.unlearn import unlearn_flow

    cfg, paths = _downstream(args, params, "unlearn")
    recipes = {m["name"]: m.get("recipe") for m in section(params, "zoo")["models"]}
    recipe = (cfg.get("original") or {}).get("recipe") or cfg.get("retrain_recipe") or recipes.get(cfg["model"])
    if not recipe:
        raise SystemExit(f"{args.params}: unlearn needs a retraining recipe (retraining is the reference): give "
                         f"unlearn.retrain_recipe or a zoo recipe for {cfg['model']!r}")
    unlearn_flow(cfg, zoo_spec(params, cfg["model"]), recipe, **paths)


def _muso_check(args, params):
    from training.unlearning.linear import exact_unlearning_check

    distances = exact_unlearning_check(n=args.n, p=args.p, forget=args.forget, seed=args.seed)
    print(f"over-parameterised linear model: {args.n} samples, {args.p} random features, {args.forget} forgotten")
    print("relative distance to the retrained weights after fine-tuning from the original:")
    for k, v in distances.items():
        print(f"  {k.replace('_', ' '):>15}: {v:.3e}")


def _optim(args, params):
    from pipelines.flows.optim import optim_flow

    cfg, paths = _downstream(args, params, "optim")
    optim_flow(cfg, zoo_spec(params, cfg["model"]), **paths)


def evaluate_kwargs(params: dict) -> dict:
    from pipelines.flows.evaluate import resolve_models
    from pipelines.flows.generate import resolve_devices

    ev = section(params, "evaluate")
    models_file = Path(section(params, "zoo")["out"]) / "models.json"
    zoo_specs = {s["name"]: s for s in json.loads(models_file.read_text())} if models_file.is_file() else {}
    return {
        "models": resolve_models(ev["models"], zoo_specs),
        "sets": shard_sets(params, ev["sets"]),
        "out": ev["out"], "batch_size": ev["batch_size"], "workers": ev["workers"],
        "devices": resolve_devices(ev["devices"], 1),
        "crop": {k: section(params, "source")[k] for k in ("size", "crop_pct", "filter")},
    }


def shard_sets(params: dict, names: list[str]) -> dict[str, str]:
    """Set name -> folder: ``clean`` is the prepare stage's output, an attack name its generate output."""
    root = Path(section(params, "generate")["out_root"])
    return {n: section(params, "source")["out"] if n == "clean" else str(root / n) for n in names}


def report_kwargs(params: dict) -> dict:
    ev, rep = section(params, "evaluate"), section(params, "report")
    return {
        "eval_dir": ev["out"], "shards_root": section(params, "generate")["out_root"],
        "clean_dir": section(params, "source")["out"], "sets": ev["sets"],
        "surrogate": surrogate_spec(params, section(params, "generate")["surrogate"]),
        "budget": section(params, "budget"), "attacks": section(params, "attacks"),
        "out_dir": rep["out"], "profile": params.get("profile", "demo"), "examples": rep["examples"],
        "victims": [m["name"] for m in section(params, "zoo")["models"]],
        "downstream": list(params["downstream"]), "downstream_dir": str(DOWNSTREAM_REPORTS),
    }


def _evaluate(args, params):
    from pipelines.flows.evaluate import evaluate

    try:
        evaluate(**evaluate_kwargs(params), metrics_path=str(args.metrics / "evaluate.json"))
    except RuntimeError as e:  # the flow run is Failed; its message names each failed model
        raise SystemExit(str(e)) from None


def _report(args, params):
    from pipelines.flows.report import report_flow

    report_flow(**report_kwargs(params))


def _serve(args, params):
    from pipelines.flows.report import scheduled_evaluation_flow

    cron = args.cron or section(params, "report")["schedule"]
    print(f"serving evaluate-and-report on cron {cron!r}, re-reading {args.params} at every run (Ctrl-C to stop)")
    scheduled_evaluation_flow.serve(name="scheduled-evaluation", cron=cron,
                                    parameters={"params_path": str(Path(args.params).resolve())})


def _publish(args, params):
    from pipelines.publish import publish

    raise SystemExit(publish(args.targets))


def _fetch(args, params):
    from pipelines.publish import fetch

    raise SystemExit(fetch(args.targets))


def _plots(args, params):
    from pipelines.plots import render_plots

    files = render_plots(args.out, args.targets)
    print(f"{len(files) - 1} plot(s) rendered offline; open {files[-1]}")


def _verify(args, params):
    from shards.verify import verify_shardset

    source = section(params, "source", args.params)
    num_classes = args.num_classes or source.get("num_classes", 1000)
    budget = params.get("budget") if args.clean else None  # the run's budget, never the samples' own records
    problems = verify_shardset(args.shards, num_classes, args.clean, budget=budget, size=source.get("size"))
    for p in problems:
        print(p)
    print(f"{args.shards}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    if problems:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="damagenet",
        description="DAmageNet pipeline: generate Attack-on-Attention shards and test models against them. "
        "Each subcommand is one DVC stage; `dvc repro` runs them in order.",
    )
    params_help = ("parameters file (default: params.yaml; accepted before or after the stage name); metrics of "
                   "another file go to metrics/<its stem>/")
    parser.add_argument("--params", default="params.yaml", help=params_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('damagenet-pipeline')}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def add(name, fn, help_text, reads_sources=False, aliases=()):
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        p.set_defaults(run=fn)
        p.add_argument("--params", default=argparse.SUPPRESS, help=params_help)
        if reads_sources:
            p.add_argument("--strict", action="store_true",
                           help="fail at the first bad source image (naming file and reason) instead of skipping it")
        return p

    add("demo-data", _demo_data, "Write the procedural demo world (class folders of JPEGs) from params 'demo_world' "
        "to worlds.demo.")
    add("real-data", _real_data, "Write the real-photo world (photos shipped in scikit-image, scikit-learn and "
        "matplotlib, each with a hand-picked ImageNet class) to worlds.real: a wnid tree val/ and flat/ + val.txt.")
    add("hub-weights", _hub_weights, "Resolve every hf-hub model of 'zoo' to its cached snapshot and the sha256 "
        "of its weights file (data/hub_weights.json); a moved refs/main changes the record, so DVC reruns what "
        "depends on that model. Lists every missing model with the command that fetches it.")
    add("zoo", _zoo, "Train the zoo models (params 'zoo'), save safetensors weights, val accuracy to metrics/zoo.json.",
        reads_sources=True)
    add("prepare", _prepare, "Index the source (params 'source'), select the subset and write the clean crops as "
        "shards; bad files go to rejects.tsv.", reads_sources=True)
    p = add("generate", _generate, "Run one attack (params 'budget', 'attacks.<name>', 'generate') over the clean "
            "shards into data/shards/<attack>, one Prefect task per shard; resumable.")
    p.add_argument("--attack", required=True, help="attack set, a key of 'attacks' in params.yaml (e.g. aoa, pgd, "
                   "aoa-authors); its 'attack' option names the method it runs (default: the key)")
    add("adv-train", _adv_train, aliases=["adv_train"],  # dvc.yaml calls downstream stages by their section name
        help_text="Adversarial training runs (params 'adv_train'): FGSM, FGSM-RS, N-FGSM, GradAlign, PGD-AT, "
        "watched for catastrophic overfitting; data/downstream/adv_train, metrics/downstream/adv_train.json, "
        "reports/downstream/adv_train (page), plots/downstream/adv_train (per-check curves).")
    add("ood", _ood, "OOD fine-tuning (params 'ood'): OE, Energy-OE, OrthLoss against the un-tuned baseline; "
        "FPR95/AUROC/AUPR (ID positive) per OOD set to metrics/downstream/ood.json, reports/downstream/ood.")
    add("unlearn", _unlearn, "Machine unlearning (params 'unlearn'): FT, GA, RL, SalUn, NatMU, SFR-on, MUSO per "
        "scenario against retraining; metrics/downstream/unlearn.json, reports/downstream/unlearn.")
    p = add("muso-check", _muso_check, "MUSO's exact-unlearning check in an over-parameterised linear model: prints the "
            "distance to the retrained weights for MUSO labels, random labels and no relabelling.")
    p.add_argument("--n", type=int, default=60, help="training samples (default 60)")
    p.add_argument("--p", type=int, default=600, help="random features, > n (default 600)")
    p.add_argument("--forget", type=int, default=12, help="samples to forget (default 12)")
    p.add_argument("--seed", type=int, default=0)
    add("optim", _optim, "Optimisers (params 'optim'): SGD vs SAM vs F-SAM from scratch, LoRA vs Flat-LoRA "
        "adaptation to a shifted split; metrics/downstream/optim.json, reports/downstream/optim.")
    add("evaluate", _evaluate, "Evaluate every model of 'evaluate.models' on every shard set of 'evaluate.sets' "
        "(cached per model weights and shard set); timm-style CSVs, per-model JSON, per-sample predictions.")
    add("report", _report, "Write the robustness report (reports/report.md, report.html) and a Prefect artifact.")
    p = add("serve", _serve, "Serve evaluate+report on a cron schedule (Prefect serve); new models in the list are "
            "evaluated against the published shards, the others come from the cache.")
    p.add_argument("--cron", help="cron schedule (default: report.schedule in params.yaml)")
    p = add("publish", _publish, "dvc push to the default remote (printed first; a missing local remote folder is "
            "created): how shard sets and reports are published.")
    p.add_argument("targets", nargs="*", help="DVC outputs or stages (default: everything)")
    p = add("fetch", _fetch, "dvc pull from the default remote, with a clear error when a local remote is missing.")
    p.add_argument("targets", nargs="*", help="DVC outputs or stages, e.g. data/shards/aoa (default: everything)")
    p = add("plots", _plots, "Render every DVC plot (the CSV curves and the image plots) offline: SVG files and an "
            "index.html under reports/plots, with Vega bundled (dvc plots show loads it from a CDN).")
    p.add_argument("targets", nargs="*", help="plot files or folders (default: every plot in dvc.yaml)")
    p.add_argument("--out", default="reports/plots", help="output folder (default: reports/plots)")
    p = add("verify", _verify, "Check a shard set: checksums, counts, unique keys, member types, PNG decoding, "
            "image size (source.size), label range and, with --clean, each label against the clean image's and "
            "every image's RMSD/L-inf against the budget in params. Exits 1 on any problem.")
    p.add_argument("shards", help="shard set folder, e.g. data/shards/aoa")
    p.add_argument("--clean", help="the clean shard set the attack started from (enables the budget checks)")
    p.add_argument("--num-classes", type=int, help="label range (default: source.num_classes from params)")
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM ends the command as Ctrl-C does, through Python's own unwinding (temporary files removed, Prefect's
    temporary server stopped), never a bare kill. While a flow runs, Prefect's handler or the flow's own
    (``generate`` stops its attacks after the current step) takes over."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)


def _unreachable_api(e: BaseException) -> str | None:
    """The API URL when ``e`` (or what caused it) is a failed connection to the Prefect API, else None."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    while e is not None:
        if isinstance(e, httpx.TransportError):
            return PREFECT_API_URL.value() or "(the temporary local server)"
        e = e.__cause__ or e.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from prefect import tags

    from shards import Stopped

    _interrupt_on_sigterm()

    args.metrics = metrics_dir(args.params)
    try:
        params = load_params(args.params)
        pin_cpu(params["reproducible"])
        labels = [f"profile:{params.get('profile', 'demo')}", f"stage:{args.stage}"]
        if getattr(args, "attack", None):
            labels.append(f"attack:{args.attack}")
        with tags(*labels):  # every flow and task run of this command carries them (Prefect UI filters)
            args.run(args, params)
    except (ConfigError, ZooError, BadSourceError, NotReproducibleHere) as e:  # a parameters, weights or source problem: its message
        print(f"damagenet {args.stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (Stopped, KeyboardInterrupt) as e:
        print(f"damagenet {args.stage}: stopped ({e})", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        api = _unreachable_api(e)
        if api is None:
            raise
        print(f"damagenet {args.stage}: the Prefect API at {api} stopped answering ({e}); what finished is kept: "
              "run the command again once it is back (or unset PREFECT_API_URL for a temporary local server)",
              file=sys.stderr)
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
