"""Whether a run reproduces a seed paper's claim, refutes it, or cannot tell.

A claim compares two numbers (the method the paper proposes against its baseline). The run can tell only when
the difference is larger than twice its standard error: over seeds (sample std), or over images for an error
rate (binomial). One seed, or too few images, is "cannot tell" and says why.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

REPRODUCES, REFUTES = "reproduces", "refutes"


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's runs over seeds: ``seeds``, then each number as the mean with ``<key>_std`` (sample std; 0 for
    one seed). Entries that are not numbers (model specs) are left out; a number that is None in any run (a metric
    at chance) stays None."""
    out: dict[str, Any] = {"seeds": len(runs)}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if any(v is None for v in values):
            out[key] = out[f"{key}_std"] = None
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = round(statistics.fmean(values), 2)
            out[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    return out


def verdict(claimed: float, baseline: float, standard_error: float | None, higher_is_better: bool = True) -> str:
    """``claimed`` should beat ``baseline``: reproduces / refutes when the gap exceeds 2 standard errors."""
    if standard_error is None:
        return "cannot tell (one seed: no error bar)"
    gap = (claimed - baseline) if higher_is_better else (baseline - claimed)
    if gap > 2 * standard_error:
        return REPRODUCES
    if gap < -2 * standard_error:
        return REFUTES
    return f"cannot tell (gap {abs(gap):.1f} within 2 standard errors, {2 * standard_error:.1f})"


def seeds_standard_error(std_a: float, n_a: int, std_b: float, n_b: int) -> float | None:
    """Standard error of a difference of two means over seeds (None with fewer than two seeds on either side)."""
    if n_a < 2 or n_b < 2:
        return None
    return math.sqrt(std_a**2 / n_a + std_b**2 / n_b)


def rates_standard_error(rate_a: float, rate_b: float, n: int) -> float | None:
    """Standard error (points) of a difference of two error rates (in %) each measured on ``n`` images."""
    if n < 1:
        return None
    p, q = rate_a / 100, rate_b / 100
    return 100 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)
