"""Whether a run reproduces a seed paper's claim, refutes it, or cannot tell: exact and standard tests from scipy.

A claim compares the method a paper proposes with its baseline. The verdict is "reproduces" or "refutes" only when
a two-sided test gives p < 0.05, and every verdict prints its p-value and the 95% interval of the difference:

- an error rate: the exact (Clopper-Pearson) interval;
- two attacks on the same images, one victim: the exact McNemar test (a binomial test on the discordant pairs);
- two attacks on the same images, several victims: the image is the unit (the victims see the same images, so they
  are not independent), an exact sign test on each image's count of fooled victims;
- paired differences get a paired bootstrap interval over images (seeded, so the page is deterministic);
- over seeds: Welch's t-test from the runs' means, sample standard deviations and counts.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

REPRODUCES, REFUTES = "reproduces", "refutes"
ALPHA = 0.05
RESAMPLES = 9999


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


def format_p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


@dataclass(frozen=True)
class Comparison:
    """The claimed method minus its baseline, with the 95% interval of that difference and the test's p-value
    (None when no test is possible, ``test`` then says why)."""

    difference: float
    low: float
    high: float
    p: float | None
    test: str

    def evidence(self) -> str:
        return (f"difference {self.difference:+.1f} [95% CI {self.low:+.1f}, {self.high:+.1f}], "
                f"{format_p(self.p)}, {self.test}")

    def outcome(self, higher_is_better: bool = True) -> str:
        """reproduces / refutes (p < 0.05, in the claimed / the other direction) or cannot tell."""
        if self.p is None or self.p >= ALPHA or self.difference == 0:
            return "cannot tell"
        return REPRODUCES if (self.difference > 0) == higher_is_better else REFUTES

    def verdict(self, higher_is_better: bool = True) -> str:
        """The outcome with its evidence, for a line of text."""
        return f"{self.outcome(higher_is_better)} ({self.test if self.p is None else self.evidence()})"


def error_interval(errors: int, n: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 95% interval, in %, of an error rate of ``errors`` out of ``n``."""
    ci = stats.binomtest(errors, n).proportion_ci(confidence_level=1 - ALPHA, method="exact")
    return 100 * ci.low, 100 * ci.high


def _paired_bootstrap(differences: np.ndarray, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of per-image differences, resampling images."""
    if np.all(differences == differences[0]):  # no spread: every resample has the same mean
        return float(differences[0]), float(differences[0])
    with warnings.catch_warnings():  # few distinct values: scipy warns that the interval may be rough; it is
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        ci = stats.bootstrap((differences,), np.mean, n_resamples=RESAMPLES, method="percentile",
                             confidence_level=1 - ALPHA, random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def _sign_test(more: int, fewer: int) -> float:
    """Two-sided exact p that ``more`` vs ``fewer`` (ties dropped) is a fair coin's."""
    return stats.binomtest(more, more + fewer).pvalue if more + fewer else 1.0


def paired_error_rates(claimed_wrong: np.ndarray, baseline_wrong: np.ndarray, seed: int = 0) -> Comparison:
    """One victim, two attacks on the same images (booleans per image: misclassified): error difference in points
    with the exact McNemar test."""
    a, b = np.asarray(claimed_wrong, bool), np.asarray(baseline_wrong, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    low, high = _paired_bootstrap(100.0 * (a.astype(float) - b), seed)
    return Comparison(100.0 * (only_a - only_b) / len(a), low, high, _sign_test(only_a, only_b),
                      f"exact McNemar, {only_a} vs {only_b} of {len(a)} images")


def paired_fooled_counts(claimed: np.ndarray, baseline: np.ndarray, victims: int, seed: int = 0) -> Comparison:
    """Several victims, two attacks on the same images (per image: how many victims it fools): mean error
    difference over the victims in points, with the exact sign test over images."""
    d = np.asarray(claimed, float) - np.asarray(baseline, float)
    low, high = _paired_bootstrap(100.0 * d / victims, seed)
    more, fewer = int(np.sum(d > 0)), int(np.sum(d < 0))
    return Comparison(100.0 * float(d.mean()) / victims, low, high, _sign_test(more, fewer),
                      f"exact sign test over {len(d)} images ({more} fool more victims, {fewer} fewer)")


def over_seeds_difference(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float,
                          n_b: int) -> Comparison:
    """Two methods over seeds (means and sample standard deviations): Welch's t-test and interval."""
    diff = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return Comparison(diff, diff, diff, None, f"{min(n_a, n_b)} seed: no test")
    va, vb = std_a**2 / n_a, std_b**2 / n_b
    if va + vb == 0:
        return Comparison(diff, diff, diff, None, f"every seed gave the same number ({n_a} vs {n_b} seeds)")
    p = stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))  # Welch-Satterthwaite
    half = stats.t.ppf(1 - ALPHA / 2, df) * (va + vb) ** 0.5
    return Comparison(diff, diff - half, diff + half, float(p), f"Welch t-test, {n_a} vs {n_b} seeds")
