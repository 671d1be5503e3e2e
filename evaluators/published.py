"""The published DAmageNet table (TPAMI 2020, Table 5; ``published_damagenet.csv``) beside a run's models, and the
sanity checks it allows: a model whose clean error is near chance, or far above the published error of the same
network, has wrong weights or preprocessing."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

PUBLISHED = Path(__file__).with_name("published_damagenet.csv")


def _published() -> list[dict[str, str]]:
    with open(PUBLISHED) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def published_join(errors: dict[str, dict[str, float]], timm_models: dict[str, str | None]
                   ) -> tuple[list[list[Any]], list[str]]:
    """The published table with our clean and AoA error beside each row, joined on the exact timm model
    (architecture and pretrained tag: other weights of a network are another model), one of ours per row at most;
    and our models no row names (or a second of ours with a row's model), to be listed apart."""
    ours: dict[str, str] = {}
    for m in errors:  # in the zoo's order: a second model of the same timm name is listed apart
        if timm_models.get(m) and timm_models[m] not in ours:
            ours[timm_models[m]] = m
    rows = []
    for r in _published():
        m = ours.get(r["timm_model"]) if r["timm_model"] else None
        rows.append([r["victim"], r["clean_top1_err"], r["damagenet_top1_err"],
                     f"{m} (`{timm_models[m]}`)" if m else "-", errors[m].get("clean", "-") if m else "-",
                     errors[m].get("aoa", "-") if m else "-"])
    joined = {m for m in ours.values() if m in {r[3].split(" ")[0] for r in rows}}
    return rows, [m for m in errors if m not in joined]


NEAR_CHANCE_ERR = 90.0  # clean top-1 error (%) at which a 1000-class model is suspect
PUBLISHED_MARGIN = 10.0  # points of clean error above the published number at which a model is suspect


def sanity_warnings(errors: dict[str, dict[str, float]], archs: dict[str, str], num_classes: int,
                    imagenet: bool) -> list[str]:
    """Models whose clean error says their weights or preprocessing are wrong: near chance on a 1000-class set, or
    (on ImageNet) 10 points worse than the published clean error of the same network."""
    published = {r["timm_model"]: float(r["clean_top1_err"]) for r in _published() if r["timm_model"]}
    warnings = []
    for m, e in errors.items():
        clean = e.get("clean")
        if clean is None:
            continue
        if num_classes >= 1000 and clean >= NEAR_CHANCE_ERR:
            warnings.append(f"{m}: clean top-1 error {clean}% on {num_classes} classes, near chance "
                            f"({100 - 100 / num_classes:.1f}%): wrong weights or preprocessing? Its other numbers "
                            "mean nothing until this is fixed.")
        pub = published.get(archs.get(m) or "") if imagenet else None
        if pub is not None and clean > pub + PUBLISHED_MARGIN:
            warnings.append(f"{m}: clean top-1 error {clean}% is {clean - pub:.1f} points above the published "
                            f"{pub}% for `{archs[m]}`: wrong weights, labels or preprocessing?")
    return warnings
