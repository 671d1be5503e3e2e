"""The dataset card (``README.md``) of a shard set, written with ``huggingface_hub`` so the Hub and ``datasets`` read
its header. Everything the card says is in its header (``damagenet`` holds what the Hub's schema has no field for);
the text below the header is rendered from the header alone. So ``verify`` can hold the whole text to its header
(:func:`render_card`) and the header to the set (:func:`card_problems`): class names, sample count, shard files and
bytes, and for an attack set its attack, surrogate, budget and numbers, recomputed from the samples' records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from shards.shardset import names_of, shard_paths

CITATION = """\
@article{chen2022aoa,
  title   = {Universal Adversarial Attack on Attention and the Resulting Dataset {DAmageNet}},
  author  = {Chen, Sizhe and He, Zhengbao and Sun, Chengjin and Yang, Jie and Huang, Xiaolin},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume  = {44},
  number  = {4},
  pages   = {2188--2197},
  year    = {2022},
  eprint  = {2001.06325},
  archivePrefix = {arXiv}
}
@misc{chen2019damagenet,
  title  = {{DAmageNet}: A Universal Adversarial Dataset},
  author = {Chen, Sizhe and Huang, Xiaolin and He, Zhengbao and Sun, Chengjin},
  year   = {2019},
  eprint = {1912.07160},
  archivePrefix = {arXiv}
}"""

# every field of a sample's JSON record: (meaning, unit); the clean set's records carry the first six
SAMPLE_FIELDS: dict[str, tuple[str, str]] = {
    "key": ("sample key, the same for a clean image and each of its adversarial versions", "-"),
    "label": ("class index, as in the `cls` member", "class index"),
    "wnid": ("WordNet id of the class (ImageNet), else the source's class folder name", "-"),
    "source_file": ("file name of the source image", "-"),
    "source_sha256": ("SHA-256 of the source file's bytes", "hex"),
    "label_set": ("acceptable classes (ImageNet-ReaL convention); only where the source gives them", "class indices"),
    "attack": ("attack method", "-"),
    "surrogate": ("zoo name of the model attacked (white-box)", "-"),
    "config_hash": ("digest of the attack's configuration", "hex"),
    "job_digest": ("digest of all that made the shard: inputs, weights, configuration", "hex"),
    "precision": ("arithmetic of the surrogate's forward and backward passes", "fp32, fp64 or bf16"),
    "seed": ("seed of the image's random draws (input transformations, initialisation)", "-"),
    "eta": ("RMSD budget", "0-255 levels"),
    "eps": ("L-inf budget", "0-255 levels"),
    "alpha": ("step size", "0-255 levels"),
    "steps": ("gradient steps taken", "steps"),
    "rmsd": ("root-mean-square difference from the clean image, after rounding to uint8", "0-255 levels"),
    "linf": ("largest absolute pixel difference from the clean image", "0-255 levels"),
    "pred_before": ("the surrogate's top-1 class on the clean image", "class index"),
    "pred_after": ("the surrogate's top-1 class on this image", "class index"),
    "p_true_before": ("the surrogate's softmax probability of the true class, clean image", "probability"),
    "p_true_after": ("the surrogate's softmax probability of the true class, this image", "probability"),
    "attention_ratio_before": ("SGLRP attention ratio on the clean image: L1 norm of the true class's map over the "
                               "runner-up's; only where SGLRP explains the surrogate", "ratio"),
    "attention_ratio_after": ("the same ratio on this image; AoA drives it down", "ratio"),
}
CLEAN_FIELDS = ("key", "label", "wnid", "source_file", "source_sha256", "label_set")
# the 0-255 scale throughout: these attack options are stored on the [0, 1] scale
_LEVELS = ("alpha", "eps", "eta")


def attack_numbers(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What an attack set's card reports, from its samples' records (rounded as printed)."""
    rmsd, linf, steps = (np.array([r[k] for r in records]) for k in ("rmsd", "linf", "steps"))
    return {
        "images": len(records),
        "surrogate_error_before": round(float(np.mean([r["pred_before"] != r["label"] for r in records])) * 100, 2),
        "surrogate_error_after": round(float(np.mean([r["pred_after"] != r["label"] for r in records])) * 100, 2),
        "rmsd_mean": round(float(rmsd.mean()), 4),
        "rmsd_max": round(float(rmsd.max()), 4),
        "linf_mean": round(float(linf.mean()), 4),
        "linf_max": round(float(linf.max()), 4),
        "steps_mean": round(float(steps.mean()), 3),
        "steps_max": int(steps.max()),
    }


def attack_parameters(options: dict[str, Any]) -> dict[str, Any]:
    """An attack's options for the card, budgets on the 0-255 scale like every other number there."""
    return {k: (round(v * 255, 4) if k in _LEVELS else v) for k, v in sorted(options.items())}


def card_data(root: Path | str, records: list[dict[str, Any]], license: dict[str, str | None],
              source_datasets: list[str], description: str, damagenet: dict[str, Any]) -> DatasetCardData:
    """The header of the set whose shards are in ``root`` and whose samples' records are ``records``: the Hub's
    fields, and ``damagenet``, what the body says (for an attack set: ``attack``, ``parameters`` and ``numbers``;
    for a clean set: ``source``)."""
    shards = shard_paths(root)
    samples, names, name = len(records), names_of(records), shards[0].name.rsplit("-", 1)[0]
    return DatasetCardData(
        pretty_name=description,
        license=license["id"],
        **({"license_name": license["name"], "license_link": license["link"]} if license["id"] == "other" else {}),
        task_categories=["image-classification"],
        tags=(["adversarial-examples", "adversarial-robustness"] if "attack" in damagenet else []) + ["damagenet",
                                                                                                   "webdataset"],
        size_categories=[_size_category(samples)],
        source_datasets=source_datasets,
        configs=[{"config_name": "default", "data_files": [{"split": "validation", "path": f"{name}-*.tar"}]}],
        dataset_info={
            "features": [{"name": "__key__", "dtype": "string"}, {"name": "png", "dtype": "image"},
                         {"name": "cls", "dtype": {"class_label": {"names": {str(i): n for i, n in names.items()}}}},
                         {"name": "json", "dtype": "json"}],
            "splits": [{"name": "validation", "num_examples": samples}],
            "download_size": sum(p.stat().st_size for p in shards),
        },
        damagenet={"set": name, "shards": len(shards), **damagenet},
    )


def _size_category(n: int) -> str:
    """The Hub's size bucket for ``n`` examples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M")]
    return next((label for bound, label in bounds if n < bound), "10M<n<100M")


def write_card(root: Path | str, data: DatasetCardData) -> None:
    (Path(root) / "README.md").write_text(render_card(data))


def read_card(root: Path | str) -> DatasetCardData:
    """The header of the card of the set in ``root``."""
    return DatasetCard.load(Path(root) / "README.md").data


def card_license(data: DatasetCardData) -> dict[str, str | None]:
    return {"id": data.license, "name": data.get("license_name"), "link": data.get("license_link")}


def render_card(data: DatasetCardData) -> str:
    """The whole ``README.md``: the header, then the text it gives."""
    d = data.to_dict()
    dn = d["damagenet"]
    body = _attack_body(d, dn) if "attack" in dn else _clean_body(dn)
    fields = [f for f in SAMPLE_FIELDS if "attack" in dn or f in CLEAN_FIELDS]
    table = "\n".join(f"| `{f}` | {SAMPLE_FIELDS[f][0]} | {SAMPLE_FIELDS[f][1]} |" for f in fields)
    name, last = dn["set"], dn["shards"] - 1
    licence = (f"[{d['license_name']}]({d['license_link']})" if d["license"] == "other" else f"`{d['license']}`")
    return str(DatasetCard(f"""---
{data.to_yaml()}
---

{body}
## Format

webdataset tar shards `{name}-000000.tar` ... `{name}-{last:06d}.tar`, {d['dataset_info']['splits'][0]['num_examples']}
samples in one `validation` split; per sample `png` (uint8 RGB, lossless), `cls` (class index) and `json` (the
record below). Index files: `shardindex.json` (wids), `_info.json` (timm's `wds/` reader), `manifest.jsonl` (key,
label, shard), `SHA256SUMS` (every file of the set; `damagenet verify` checks them and this card).

| JSON field | meaning | unit |
|---|---|---|
{table}

Read from this folder:

```python
import os

import datasets  # pip install datasets
import timm.data
import webdataset as wds

# only= : decode the format's fields and nothing else (a stray .pyd member would otherwise be unpickled)
ds = (wds.WebDataset("{name}-{{000000..{last:06d}}}.tar", shardshuffle=False)
      .decode("rgb8", only=["png", "cls", "json"]).to_tuple("png", "cls", "json"))
timm_ds = timm.data.create_dataset("wds/{name}", root=".", split="validation")  # reads _info.json
hf_ds = datasets.load_dataset(os.getcwd(), split="validation")  # named classes, __key__, JSON record (this card)
```

## Licence

Derived from the source images, whose licence and terms apply: {licence}.

## Citation

```bibtex
{CITATION}
```
"""))


def _attack_body(d: dict, dn: dict) -> str:
    a, b = dn["attack"], dn["attack"]["budget"]
    params = "\n".join(f"| {k} | {v} |" for k, v in dn["parameters"].items())
    nums = "\n".join(f"| {k} | {v} |" for k, v in dn["numbers"].items())
    return f"""# {d['pretty_name']}

Adversarial versions of the clean crops in `{a['clean_set']}`, made by the `{a['method']}` attack on the surrogate
`{a['surrogate']}` (timm `{a['surrogate_arch']}`), under one budget shared by every attack of this run: RMSD at most
{b['eta']} and L-inf at most {b['eps']} (0-255 scale) after rounding to uint8, step {b['alpha']}, at most
{b['max_steps']} steps. AoA (Attack on Attention) moves the surrogate's SGLRP attention off the true class; the
baselines maximise cross-entropy with sign steps.

## Parameters (budgets on the 0-255 scale)

| parameter | value |
|---|---|
{params}

## Numbers (from the samples' records; errors in %)

| metric | value |
|---|---|
{nums}
"""


def _clean_body(dn: dict) -> str:
    s = dn["source"]
    sets = (f"\n- label sets (ImageNet-ReaL convention) from `{s['label_sets']}`: {s['with_label_set']} images have "
            "a non-empty set of acceptable classes (`label_set`); the others are left out of ReaL accuracy"
            if s["label_sets"] else "")
    return f"""# Clean crops

The unattacked source images of this pipeline run, after the crop every attack and evaluation uses: resize the
short side to floor({s['size']} / {s['crop_pct']}) with the {s['filter']} filter (antialiased), then centre-crop
{s['size']} x {s['size']}; stored as PNG (lossless).

- source: `{s['kind']}` at `{s['root']}`
- images: {s['images']}; rejected source files: {s['rejects']} (listed in `rejects.tsv` with the reason){sets}
"""


def card_problems(root: Path | str, records: list[dict[str, Any]] | None) -> list[str]:
    """What is wrong with the card of the set in ``root``: unreadable, text other than its header gives, or a header
    that disagrees with the set (``_info.json``, the shards, the samples' ``records`` as the caller read them; None:
    they could not all be read, so only the text is checked)."""
    root = Path(root)
    path = root / "README.md"
    if not path.is_file():
        return [f"{path}: missing (the dataset card)"]
    try:
        card = DatasetCard.load(path)
        expected_text = render_card(card.data)
    except Exception as e:  # noqa: BLE001  (any unreadable card is a problem to report)
        return [f"{path}: unreadable dataset card ({type(e).__name__}: {e})"]
    problems = []
    if path.read_text() != expected_text:
        problems.append(f"{path}: its text is not the one its header gives (edited by hand?)")
    d, shards = card.data.to_dict(), shard_paths(root)
    if not shards or records is None:
        return problems
    try:
        info = json.loads((root / "_info.json").read_text())["splits"]["validation"]
    except (OSError, ValueError, KeyError):
        return problems  # the index checks report it
    dn = d["damagenet"]
    expected = {
        "configs[0].data_files": [{"split": "validation", "path": f"{shards[0].name.rsplit('-', 1)[0]}-*.tar"}],
        "dataset_info.splits": [{"name": "validation", "num_examples": info["num_samples"]}],
        "dataset_info.download_size": sum(p.stat().st_size for p in shards),
        "size_categories": [_size_category(info["num_samples"])],
        "class names": {str(i): n for i, n in names_of(records).items()},
        "damagenet.shards": len(shards),
    }
    actual = {
        "configs[0].data_files": d["configs"][0]["data_files"],
        "dataset_info.splits": d["dataset_info"]["splits"],
        "dataset_info.download_size": d["dataset_info"]["download_size"],
        "size_categories": d["size_categories"],
        "class names": d["dataset_info"]["features"][2]["dtype"]["class_label"]["names"],
        "damagenet.shards": dn["shards"],
    }
    if "attack" in dn:
        a = dn["attack"]
        expected["damagenet.numbers"] = attack_numbers(records)
        actual["damagenet.numbers"] = dn["numbers"]
        for field, value in (("attack", a["method"]), ("surrogate", a["surrogate"]),
                             *((k, a["budget"][k]) for k in _LEVELS)):
            seen = sorted({str(r.get(field)) for r in records})
            expected[f"damagenet.attack ({field})"], actual[f"damagenet.attack ({field})"] = seen, [str(value)]
    problems += [f"{path}: {k} says {actual[k]}, the set has {v}" for k, v in expected.items() if actual[k] != v]
    return problems
