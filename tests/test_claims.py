"""Verdicts from exact and standard tests: reproduce / refute only at p < 0.05, each checked against an independent
computation (closed-form binomial sums, scipy's t-test on raw samples), otherwise "cannot tell"."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from evaluators.claims import (
    error_interval,
    over_seeds,
    over_seeds_difference,
    paired_error_rates,
    paired_fooled_counts,
)


def _exact_two_sided(k: int, n: int) -> float:
    """McNemar's exact p by hand: twice the smaller binomial(n, 1/2) tail, at most 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _pairs(only_a: int, only_b: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return np.array(a), np.array(b)


@pytest.mark.parametrize("seed", range(5))
def test_mcnemar_matches_the_binomial_sum_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random(60) < 0.6, rng.random(60) < 0.4
    c = paired_error_rates(a, b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert c.p == pytest.approx(_exact_two_sided(only_a, only_a + only_b))
    assert c.difference == pytest.approx(100 * (a.mean() - b.mean()))
    assert c.low <= c.difference <= c.high
    assert paired_error_rates(a, b) == c  # seeded: the same page every time


def test_the_real_profile_case_cannot_tell_and_a_large_paired_gap_can():
    # 9 photos: AoA fools 4 that the baseline does not, the baseline none that AoA does not; p = 2/2^4
    small = paired_error_rates(*_pairs(4, 0, 3, 2))
    assert small.p == pytest.approx(0.125) and small.outcome() == "cannot tell"
    assert "p = 0.12" in small.verdict() and "4 vs 0 of 9 images" in small.verdict()
    large = paired_error_rates(*_pairs(40, 10, 20, 30))
    assert large.p == pytest.approx(_exact_two_sided(10, 50)) and large.p < 1e-4
    assert large.outcome() == "reproduces" and large.outcome(higher_is_better=False) == "refutes"
    assert large.difference == pytest.approx(30.0) and 0 < large.low < 30 < large.high


def test_a_baseline_at_100_percent_is_not_a_zero_error_bar():
    """An unpaired Wald error collapsed to 0 here; the paired test sees 2 discordant images and cannot tell."""
    c = paired_error_rates(*_pairs(0, 2, 7, 0))
    assert c.p == 0.5 and c.outcome() == "cannot tell" and c.low < c.high


def test_the_sign_test_takes_the_image_as_unit():
    aoa, base = np.array([3, 2, 2, 0, 1, 3]), np.array([1, 2, 0, 0, 2, 1])  # more, tie, more, tie, fewer, more
    c = paired_fooled_counts(aoa, base, victims=3)
    assert c.p == pytest.approx(_exact_two_sided(1, 4))  # 3 images fool more victims, 1 fewer, ties dropped
    assert c.difference == pytest.approx(100 * (aoa - base).mean() / 3)
    assert "3 fool more victims, 1 fewer" in c.test


@pytest.mark.parametrize("seed", range(3))
def test_welch_from_summaries_matches_scipy_on_the_samples(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(70, 3, size=3), rng.normal(65, 5, size=4)
    c = over_seeds_difference(a.mean(), a.std(ddof=1), 3, b.mean(), b.std(ddof=1), 4)
    reference = stats.ttest_ind(a, b, equal_var=False)
    ci = reference.confidence_interval()
    assert c.p == pytest.approx(reference.pvalue) and (c.low, c.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert c.outcome() == ("cannot tell" if reference.pvalue >= 0.05 else "reproduces" if a.mean() > b.mean()
                           else "refutes")


def test_one_seed_or_no_spread_is_no_test():
    assert over_seeds_difference(99.0, 0.0, 1, 1.0, 0.0, 3).verdict() == "cannot tell (1 seed: no test)"
    assert over_seeds_difference(80.0, 0.0, 3, 70.0, 0.0, 3).outcome() == "cannot tell"


def test_clopper_pearson_against_its_beta_quantiles():
    for k, n in ((0, 9), (7, 9), (9, 9), (40, 300)):
        low, high = error_interval(k, n)
        assert low == pytest.approx(100 * (stats.beta.ppf(0.025, k, n - k + 1) if k else 0.0))
        assert high == pytest.approx(100 * (stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0))


def test_co_claim_reads_the_runs_events():
    from evaluators.downstream_report import _co_claim

    def run(method, events):
        return {"method": method, "co_events": [{"step": 1}] * events, "final_val_fgsm_acc": 50.0,
                "final_val_pgd_acc": 10.0}

    assert "reproduces" in _co_claim({"fgsm": run("fgsm", 1), "n": run("n-fgsm", 0)})
    assert "refutes: n collapsed too" in _co_claim({"fgsm": run("fgsm", 1), "n": run("n-fgsm", 1)})
    quiet = _co_claim({"fgsm": run("fgsm", 0), "n": run("n-fgsm", 0)})
    assert "cannot tell: plain FGSM did not collapse" in quiet and "fgsm 40.0, n 40.0" in quiet


def test_over_seeds_is_the_mean_and_sample_std_and_keeps_chance_as_none():
    import numpy as np

    runs = [{"spec": {"name": "a"}, "acc": 80.0, "MIA": 60.0, "seconds": 1},
            {"spec": {"name": "b"}, "acc": 84.0, "MIA": None, "seconds": 2},
            {"spec": {"name": "c"}, "acc": 89.0, "MIA": 70.0, "seconds": 3}]
    out = over_seeds(runs)
    assert out["seeds"] == 3 and "spec" not in out
    assert out["acc"] == round(float(np.mean([80, 84, 89])), 2)
    assert out["acc_std"] == round(float(np.std([80, 84, 89], ddof=1)), 2)
    assert out["MIA"] is None and out["MIA_std"] is None  # at chance in one seed: not averaged away
    assert over_seeds(runs[:1]) == {"seeds": 1, "acc": 80.0, "acc_std": 0.0, "MIA": 60.0, "MIA_std": 0.0,
                                    "seconds": 1.0, "seconds_std": 0.0}
