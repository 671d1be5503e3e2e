"""From the typed parameters (:class:`pipelines.config.Params`) to each stage's flow arguments, in one place.

The CLI parses its arguments and calls a flow with what these functions return; a scheduled run
(:func:`pipelines.flows.report.scheduled_evaluation_flow`) re-reads the parameters and uses the same functions.
Where the stages write is fixed here as dvc.yaml declares it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.budget import Budget
from model_zoo.spec import MissingModel, ModelSpec
from pipelines.config import (
    DOWNSTREAM,
    WORLDS,
    AttackOptions,
    ConfigError,
    Evaluate,
    Generate,
    ModelPattern,
    ModelsFile,
    Params,
    Report,
    Source,
    Zoo,
)
from pipelines.params import metrics_dir

# the hub-weights record: the snapshot and sha256 of every hub model (dvc.yaml's hub_weights stage writes it)
HUB_WEIGHTS = Path("data/hub_weights.json")
# where the downstream stages write, as dvc.yaml declares it
DOWNSTREAM_OUT, DOWNSTREAM_REPORTS, DOWNSTREAM_PLOTS = (Path("data/downstream"), Path("reports/downstream"),
                                                         Path("plots/downstream"))


@dataclass(frozen=True)
class DownstreamPaths:
    """Where a downstream stage writes: weights and specs (``out``), its metrics file, the report folder its section
    goes to, and the folder of its curves."""

    out: Path
    metrics: Path
    reports: Path
    plots: Path

    @classmethod
    def of(cls, stage: str, metrics: Path) -> DownstreamPaths:
        """The paths dvc.yaml declares for ``stage``, with its metrics under the run's ``metrics`` folder."""
        return cls(DOWNSTREAM_OUT / stage, metrics / "downstream" / f"{stage}.json", DOWNSTREAM_REPORTS,
                   DOWNSTREAM_PLOTS / stage)


def resolve_models(entries: list[str | ModelsFile | ModelPattern | ModelSpec],
                   zoo_specs: dict[str, ModelSpec]) -> list[ModelSpec | MissingModel]:
    """Entries are zoo names, ``{models_file}`` (the specs a training stage wrote), ``{pattern, weights}``
    expanded with timm's registry, or full specs; a name not in the zoo or a missing models file resolves to a
    :class:`MissingModel` naming the problem."""
    specs: list[ModelSpec | MissingModel] = []
    for e in entries:
        if isinstance(e, ModelsFile):
            path = Path(e.models_file)
            if not path.is_file():
                specs.append(MissingModel(name=str(path), error=f"{path}: not found (run the stage that writes it)"))
            else:
                specs += read_models_file(path)
        elif isinstance(e, str):
            specs.append(zoo_specs[e] if e in zoo_specs else
                         MissingModel(name=e, error=f"unknown model {e!r}: not in the zoo ({', '.join(zoo_specs)})"))
        elif isinstance(e, ModelPattern):
            import timm  # only here: the stages' arguments are made without torch

            specs += [ModelSpec(name=arch, arch=arch, weights=e.weights, num_classes=1000)
                      for arch in timm.list_models(e.pattern, pretrained=e.weights == "hf-hub")]
        else:
            specs.append(e)
    return specs


def read_models_file(path: Path) -> list[ModelSpec]:
    """The specs a stage wrote to ``path`` (``models.json``)."""
    return [ModelSpec.model_validate(s) for s in json.loads(path.read_text())]


def resolve_devices(devices: str | list[str], cpu_workers: int) -> list[str]:
    """``auto``: every GPU, else ``cpu_workers`` CPU workers; a list is taken as given."""
    if devices == "auto":
        import torch

        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"] * cpu_workers
    return list(devices)


def world(params: Params, name: str) -> dict[str, Any]:
    """``<name>-data`` (demo, real, mnist): the folder to write the world to and its own settings."""
    if name not in params.worlds:
        raise ConfigError(f"{params.path}: 'worlds' has no entry {name!r} (the folder to write it to)")
    return {"root": params.worlds[name], **params.require(WORLDS[name]).model_dump(), "profile": params.profile}


def hub_weights(params: Params) -> dict[str, Any]:
    return {"zoo": params.require(Zoo), "out": str(HUB_WEIGHTS), "profile": params.profile}


def zoo(params: Params, metrics: Path, strict: bool) -> dict[str, Any]:
    hub = json.loads(HUB_WEIGHTS.read_text()) if HUB_WEIGHTS.is_file() else None
    return {"zoo": params.require(Zoo), "metrics_path": str(metrics / "zoo.json"), "strict": strict,
            "hub": hub, "profile": params.profile}


def prepare(params: Params, metrics: Path, strict: bool) -> dict[str, Any]:
    return {"source": params.require(Source), "metrics_path": str(metrics / "prepare.json"),
            "strict": strict, "profile": params.profile}


def trained_specs(params: Params) -> dict[str, ModelSpec]:
    """The resolved zoo specs by name, as the zoo stage wrote them (empty before it has run)."""
    models_file = Path(params.require(Zoo).out) / "models.json"
    return {s.name: s for s in read_models_file(models_file)} if models_file.is_file() else {}


def surrogate_spec(params: Params, attack: str | None = None) -> ModelSpec:
    """The resolved zoo spec (written by the zoo stage) of the surrogate of attack set ``attack``: its own
    ``surrogate`` option, else ``generate.surrogate`` (also the run's surrogate when ``attack`` is None)."""
    options = params.attack_sets().get(attack) if attack else None
    key, name = ((f"attacks.{attack}.surrogate", options.surrogate) if options and options.surrogate
                 else ("generate.surrogate", params.require(Generate).surrogate))
    models_file = Path(params.require(Zoo).out) / "models.json"
    if not models_file.is_file():
        raise ConfigError(f"{models_file}: not found (run the zoo stage first)")
    specs = trained_specs(params)
    if name not in specs:
        raise ConfigError(f"{params.path}: {key} {name!r} is not a model the zoo stage wrote to {models_file} "
                          f"(have: {', '.join(specs)})")
    return specs[name]


def generate(params: Params, attack: str, metrics: Path) -> dict[str, Any]:
    """One attack set: its method (``attack:``, default the set's name) and options, under the run's budget."""
    gen, attacks = params.require(Generate), params.attack_sets()
    if attack not in attacks:
        raise ConfigError(f"{params.path}: attack {attack!r} has no entry under 'attacks' (have: {', '.join(attacks)})")
    options = attacks[attack]
    # the switch fixes the threads unless the params give a number themselves (auto follows the core count)
    threads = params.reproducible.threads if params.reproducible and gen.cpu_threads == "auto" else gen.cpu_threads
    return {
        "attack": attack, "method": options.attack or attack,
        "budget": params.require(Budget), "options": options.attack_options(),
        "surrogate": surrogate_spec(params, attack),
        "clean_dir": params.require(Source).out,
        "out_dir": str(Path(gen.out_root) / attack),
        "sub_batch": gen.sub_batch, "batch_size": gen.batch_size, "devices": gen.devices,
        "cpu_workers": gen.cpu_workers, "cpu_threads": threads, "seed": gen.seed, "dask": gen.dask,
        "metrics_path": str(metrics / "generate" / f"{attack}.json"), "profile": params.profile,
    }


def zoo_spec(params: Params, name: str) -> ModelSpec:
    """The zoo spec of ``name`` as the zoo stage resolves it (architecture and data config; no weights needed)."""
    specs = {s.name: s for s in params.require(Zoo).specs()}
    if name not in specs:
        raise ConfigError(f"{params.path}: no zoo model named {name!r} (have: {', '.join(specs)})")
    return specs[name]


def downstream(params: Params, stage: str, metrics: Path) -> dict[str, Any]:
    """A downstream stage (adv_train, ood, unlearn, optim): its typed section, its output folder, the model's spec,
    and the flow's metrics, report and curve paths; unlearning also gets the recipe it retrains with."""
    section = params.require(DOWNSTREAM[stage])
    args = {"cfg": section, "spec": zoo_spec(params, section.model), "paths": DownstreamPaths.of(stage, metrics),
            "profile": params.profile}
    if stage == "unlearn":
        zoo_recipes = {m.name: m.recipe for m in params.require(Zoo).models}
        recipe = (section.original.recipe if section.original else None) or section.retrain_recipe or zoo_recipes.get(
            section.model)
        if not recipe:
            raise ConfigError(f"{params.path}: unlearn needs a retraining recipe (retraining is the reference): give "
                              f"unlearn.retrain_recipe or a zoo recipe for {section.model!r}")
        args["original_recipe"] = recipe
    return args


def shard_sets(params: Params, names: list[str]) -> dict[str, str]:
    """Set name -> folder: ``clean`` is the prepare stage's output, an attack set's name its generate output."""
    root = Path(params.require(Generate).out_root)
    return {n: params.require(Source).out if n == "clean" else str(root / n) for n in names}


def _stage_that_writes(set_name: str) -> str:
    return "dvc repro prepare" if set_name == "clean" else f"dvc repro generate@{set_name}"


def require_inputs(params: Params, sets: dict[str, str], models: list) -> None:
    """Inputs another stage writes, present before a stage that reads them starts (one line naming the stage to run
    first): every shard set (its SHA256SUMS, written last) and, for models named from the zoo, the zoo's record."""
    from shards.verify import verify_files  # here: the other stages' arguments are made without torch

    for name, folder in sets.items():
        if not (Path(folder) / "SHA256SUMS").is_file():
            raise ConfigError(f"{folder}: shard set {name!r} not found (run `{_stage_that_writes(name)}` first)")
        problems = verify_files(folder)  # the set is exactly the files it lists, with their checksums
        if problems:
            raise ConfigError(f"{problems[0]} (shard set {name!r}: {len(problems)} problem(s); `damagenet verify "
                              f"{folder}` lists them)")
    models_file = Path(params.require(Zoo).out) / "models.json"
    if any(isinstance(m, str) for m in models) and not models_file.is_file():
        raise ConfigError(f"{models_file}: not found (run `dvc repro zoo` first)")


def evaluate(params: Params) -> dict[str, Any]:
    ev, source = params.require(Evaluate), params.require(Source)
    sets = shard_sets(params, ev.sets)
    require_inputs(params, sets, ev.models)
    return {
        "models": resolve_models(ev.models, trained_specs(params)),
        "sets": sets,
        # this parameters file's metrics, as for `damagenet evaluate --params` (a scheduled run of another profile
        # wrote the default's metrics/evaluate.json)
        "metrics_path": str(metrics_dir(params.path) / "evaluate.json"),
        "out": ev.out, "batch_size": ev.batch_size, "workers": ev.workers,
        "devices": resolve_devices(ev.devices, 1),
        "source": source, "profile": params.profile,
    }


def report(params: Params) -> dict[str, Any]:
    ev, rep, attacks = params.require(Evaluate), params.require(Report), params.attack_sets()
    attack_sets = {s: attacks.get(s, AttackOptions()) for s in ev.sets if s != "clean"}
    return {
        "eval_dir": ev.out, "shards_root": params.require(Generate).out_root,
        "clean_dir": params.require(Source).out, "sets": ev.sets,
        "surrogate": surrogate_spec(params), "budget": params.require(Budget),
        "methods": {s: o.attack or s for s, o in attack_sets.items()},
        "options": {s: o.attack_options() for s, o in attack_sets.items()},
        "set_surrogates": {s: surrogate_spec(params, s) for s in attack_sets},
        "out_dir": rep.out, "profile": params.profile, "examples": rep.examples,
        "victims": [m.name for m in params.require(Zoo).models],
        "downstream": list(params.downstream), "downstream_dir": str(DOWNSTREAM_REPORTS),
    }
