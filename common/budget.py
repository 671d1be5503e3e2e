"""The attack budget as ``params.yaml`` gives it (0-255 scale): the schema checks it, every shard job carries it,
and every adversarial record repeats it (:mod:`shards.job`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

Positive = Annotated[int, Field(gt=0)]
PixelLevels = Annotated[float, Field(gt=0, le=255, allow_inf_nan=False)]  # a finite amount on the 0-255 scale


class Budget(BaseModel):
    """0-255 scale: finite, at most 255 (a whole pixel range), and the step no larger than the L-inf bound."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    eta: PixelLevels  # RMSD from the clean image, after rounding to uint8 (DAmageNet: 7)
    eps: PixelLevels  # L-inf bound (DAmageNet: 25.5)
    alpha: PixelLevels  # step size (DAmageNet: 2)
    max_steps: Positive

    @model_validator(mode="after")
    def _step_within_bound(self):
        if self.alpha > self.eps:
            raise ValueError(f"alpha ({self.alpha}) is larger than eps ({self.eps}): one step would leave the L-inf "
                             "ball")
        return self
