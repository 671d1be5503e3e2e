"""The typed schema of ``params.yaml``: every section a strict pydantic model, checked when the parameters load.

Unknown keys (a typo such as ``min_sidee``), wrong types (``shard_size: "50"``, ``eta: "seven"``; no silent
coercion) and values out of range (``eta: -1``) are errors that name the file, the key and the problem in one line.
Method-specific dictionaries deeper down (training recipes, runs, scenarios) are checked by the stage that reads
them, which knows their keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from attacks.precision import PRECISIONS
from attacks.sglrp import BOUNDS, INACTIVE_POOL, RELU

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Devices = Literal["auto"] | list[str]


class ConfigError(ValueError):
    """Invalid parameters; the message is one line naming the file, the key and the problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _AsGiven(_Section):
    """Loads back as written (no defaults added): these dicts travel on into model specs and job digests."""

    @model_serializer(mode="wrap")
    def _given_only(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set and v is not None}


class DemoWorld(_Section):
    root: str
    seed: int
    size: Positive
    train: Positive
    val: Positive
    outliers: NonNegative = 0


class ZooModel(_AsGiven):
    name: str
    arch: str
    role: Literal["surrogate", "victim"] | None = None
    weights: str | None = None
    num_classes: Positive | None = None
    kwargs: dict[str, Any] = {}
    data: dict[str, Any] = {}
    recipe: dict[str, Any] | None = None


class Zoo(_Section):
    out: str
    train_root: str | None = None
    val_root: str | None = None
    img_size: Positive | None = None
    num_classes: Positive = 1000
    seed: int = 0
    models: list[ZooModel]


class Select(_Section):
    mode: Literal["all", "first", "per_class"] = "all"
    n: NonNegative = 0
    seed: int = 0


class Source(_Section):
    kind: Literal["class_folder", "label_file"]
    root: str
    label_file: str | None = None
    num_classes: Positive = 1000
    size: Positive
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    filter: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"
    min_side: Positive = 16
    select: Select = Select()
    shard_size: Positive
    out: str


class Budget(_Section):
    """0-255 scale."""

    eta: PositiveFloat
    eps: PositiveFloat
    alpha: PositiveFloat
    max_steps: Positive


class AttackOptions(_AsGiven):
    """One attack's own options (:class:`attacks.base.AttackConfig` fields and AoA's SGLRP conventions); an option
    left out keeps the attack's default."""

    si: Positive | None = None
    si_x_twice: bool | None = None
    di: Annotated[float, Field(ge=0, le=1)] | None = None
    ti: NonNegative | None = None
    mi: Annotated[float, Field(ge=0)] | None = None
    precision: Literal[PRECISIONS] | None = None
    seed: int | None = None
    lam: float | None = None
    bounds: Literal[BOUNDS] | None = None
    relu: Literal[RELU] | None = None
    inactive_pool: Literal[INACTIVE_POOL] | None = None


class Dask(_Section):
    address: str | None = None
    n_workers: NonNegative = 0


class Generate(_Section):
    surrogate: str
    batch_size: Positive
    devices: Devices = "auto"
    cpu_workers: Positive = 1
    seed: int = 0
    out_root: str
    dask: Dask = Dask()


class Evaluate(_Section):
    models: list[str | dict[str, Any]]
    sets: list[str]
    batch_size: Positive = 256
    devices: Devices = "auto"
    workers: NonNegative = 0
    out: str


class Report(_Section):
    out: str
    examples: NonNegative = 4
    schedule: str = "0 3 * * *"


class Monitor(_Section):
    every: Positive
    n: Positive
    pgd_steps: Positive
    threshold: PositiveFloat
    response: Literal["log", "rollback"] = "log"
    step_factor: Annotated[float, Field(gt=0, le=1)] = 0.5
    layers: list[str] | None = None


class AdvTrain(_Section):
    model: str
    train_root: str
    val_root: str
    out: str
    plots: str
    seed: int = 0
    mix_shards: list[str] | None = None
    recipe: dict[str, Any]
    monitor: Monitor
    runs: dict[str, dict[str, Any]]


class Ood(_Section):
    model: str
    train_root: str
    val_root: str
    id_classes: list[NonNegative] | None = None
    pretrain: dict[str, Any] | None = None
    aux_outliers: dict[str, Any]
    test_ood: dict[str, dict[str, Any]]
    recipe: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seed: int = 0
    out: str


class Unlearn(_Section):
    model: str
    train_root: str
    val_root: str
    seed: int = 0
    scenarios: dict[str, dict[str, Any]]
    recipe: dict[str, Any]
    retrain_recipe: dict[str, Any] | None = None
    methods: dict[str, dict[str, Any] | None]
    out: str


class Optim(_Section):
    model: str
    train_root: str
    val_root: str
    seed: int = 0
    recipe: dict[str, Any]
    optimizers: dict[str, dict[str, Any] | None]
    lora: dict[str, Any]
    shard_sets: dict[str, str]
    out: str


class Params(_Section):
    """A file may leave out sections its commands do not read (``damagenet verify`` needs only ``source``); a stage
    whose section is missing fails naming it."""

    profile: str = "demo"
    demo_world: DemoWorld | None = None
    zoo: Zoo | None = None
    source: Source | None = None
    budget: Budget | None = None
    attacks: dict[str, AttackOptions | None] | None = None
    generate: Generate | None = None
    evaluate: Evaluate | None = None
    report: Report | None = None
    adv_train: AdvTrain | None = None
    ood: Ood | None = None
    unlearn: Unlearn | None = None
    optim: Optim | None = None


def validate_params(params: Any, path: str) -> dict[str, Any]:
    """``params`` with the schema's defaults filled in, or :class:`ConfigError` listing every problem on one line."""
    try:
        return Params.model_validate(params).model_dump()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "list[")))
            msg = "unknown key (not a parameter of this section)" if err["type"] == "extra_forbidden" else err["msg"]
            value = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err['input']!r})"
            problems.append(f"{key}: {msg}{value}")
        raise ConfigError(f"{path}: " + "; ".join(dict.fromkeys(problems))) from None
