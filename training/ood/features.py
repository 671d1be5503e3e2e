"""Penultimate features of any timm model behind the ``ImageClassifier`` wrapper, and its class weights.

timm splits every model into ``forward_features`` and ``forward_head``; ``forward_head(pre_logits=True)`` is the
pooled feature vector the classifier layer consumes, so ``logits == classifier(features)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of [0,1] images: one pass through the body, the head applied to the features."""
    net = model.model
    feats = net.forward_head(net.forward_features(model.normalize(x)), pre_logits=True)
    return feats, net.get_classifier()(feats)


def class_weights(model: nn.Module) -> torch.Tensor:
    """The classifier's weight matrix (classes x features)."""
    head = model.model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model.model).__name__}: classifier is {type(head).__name__}, expected nn.Linear")
    return head.weight
