"""One interface for unlearning methods: given the original model and the split into forget and remaining data,
``unlearn`` changes the model in place. Methods that fine-tune use the shared training loop and optimiser
registry; each module holds one method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.supervised import Recipe, train_classifier


@dataclass
class UnlearningData:
    """uint8 NCHW images with int64 labels; ``forget`` and ``remain`` partition the original training set."""

    forget: tuple[torch.Tensor, torch.Tensor]
    remain: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


@dataclass
class UnlearningMethod:
    """Subclasses implement ``unlearn``; ``recipe`` holds the settings from params.yaml over the method's
    ``defaults`` (fine-tuning methods: the shared training ``Recipe``)."""

    recipe: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    name = "base"
    defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self):
        self.recipe = {**self.defaults, **self.recipe}

    def unlearn(self, model: nn.Module, data: UnlearningData) -> None:
        raise NotImplementedError

    def fine_tune(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, **overrides) -> None:
        """The shared loop on ``(images, targets)``; ``targets`` may be class indices or class distributions."""
        settings = {"warmup_epochs": 0, "label_smoothing": 0.0, **self.recipe, **overrides}
        unknown = set(settings) - set(Recipe.model_fields)
        if unknown:
            raise ValueError(f"unlearning method {self.name!r}: unknown recipe keys {sorted(unknown)}")
        recipe = Recipe(**settings)
        train_classifier(model, images, targets, recipe, seed=self.seed, desc=self.name,
                         objective=lambda m, x, y: F.cross_entropy(m(x), y))


def random_other_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from each true one."""
    offset = torch.randint(1, num_classes, labels.shape, generator=gen)
    return (labels + offset) % num_classes


def masked_gradients(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Register gradient hooks that zero the unmasked weights' gradients; returns the handles (remove them)."""
    params = dict(model.named_parameters())
    return [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
