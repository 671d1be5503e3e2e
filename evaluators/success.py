"""Attack success rates as transfer papers count them, from per-image predictions on the same images.

Papers disagree on the denominator (TransferAttack's issue #101), so both are given, each with its exact
(Clopper-Pearson) 95% interval:

- ``asr_all``: the share of all attacked images the victim misclassifies (TransferAttack's README tables: its
  1,000 images, whatever the victim made of the clean ones), which is the victim's top-1 error on the set;
- ``asr_correct``: the share of the images the victim classifies correctly clean that it misclassifies after the
  attack (no credit for images the victim already got wrong).
"""

from __future__ import annotations

from typing import Any

from evaluators.claims import error_interval


def success_rates(clean: list[dict[str, Any]], attacked: list[dict[str, Any]]) -> dict[str, Any]:
    """Both success rates (%) of one attack set on one victim, from its predictions (``key``, ``label``, ``top5``) on
    the clean set and on the attack set; images of the attack set without a clean prediction are left out."""
    right_clean = {p["key"]: p["top5"][0] == p["label"] for p in clean}
    fooled = {p["key"]: p["top5"][0] != p["label"] for p in attacked if p["key"] in right_clean}
    among_correct = [fooled[k] for k in fooled if right_clean[k]]
    return {**_rate("asr_all", sum(fooled.values()), len(fooled)),
            **_rate("asr_correct", sum(among_correct), len(among_correct))}


def _rate(name: str, k: int, n: int) -> dict[str, Any]:
    if not n:
        return {name: None, f"{name}_ci": None, f"{name}_n": 0}
    low, high = error_interval(k, n)
    return {name: round(100 * k / n, 2), f"{name}_ci": [round(low, 2), round(high, 2)], f"{name}_n": n}
