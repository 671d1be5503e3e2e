"""A training recipe: what every stage that trains (zoo, adversarial training, OOD fine-tuning, unlearning, the
optimiser comparison) reads from ``params.yaml``. Import-light (no torch), so the parameters are checked without it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Recipe(BaseModel):
    """Per-family training settings (small CNNs, MobileNets and ConvNeXts need different ones at demo scale).
    A recipe given as overrides (a run's, a method's) holds only what it changes: :meth:`updated` applies it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    epochs: Annotated[int, Field(gt=0)] = 10
    lr: Annotated[float, Field(gt=0)] = 2e-3
    batch_size: Annotated[int, Field(gt=0)] = 64
    optimizer: str = "adamw"  # a name of training.optimizers (sgd, adamw, sam, fsam)
    optimizer_kwargs: dict[str, Any] = {}  # momentum, rho, sigma, lam, base
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shift: Annotated[int, Field(ge=0)] = 3  # random translation in pixels (reflect-padded crop); no flips: diagonal stripes are a class
    schedule: Literal["cosine", "cyclic", "constant"] = "cosine"  # cosine: warm-up then cosine decay; cyclic: triangle (fast AT)
    peak: Annotated[float, Field(gt=0, lt=1)] = 0.5  # cyclic: where the triangle peaks, as a share of the run (Wong et al.: 1/2 CIFAR-10, 2/5 MNIST)
    freeze_norm: bool = False  # keep BatchNorm statistics as they are (adapters such as LoRA adapt, nothing else)

    def updated(self, overrides: Recipe | None = None, **changes: Any) -> Recipe:
        """This recipe with what ``overrides`` gives (only its given fields) and ``changes``."""
        given = overrides.model_dump(include=overrides.model_fields_set) if overrides else {}
        return Recipe.model_validate({**self.model_dump(), **given, **changes})

    def given(self) -> dict[str, Any]:
        """The fields as written (for a page heading: ``epochs 3, lr 0.05``)."""
        return self.model_dump(include=self.model_fields_set)
