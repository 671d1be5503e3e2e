"""Seed-claim verdicts: reproduce / refute only beyond twice the standard error, otherwise "cannot tell"."""

from __future__ import annotations

import math

import pytest

from evaluators.claims import over_seeds, rates_standard_error, seeds_standard_error, verdict


def test_verdict_needs_a_gap_beyond_two_standard_errors():
    assert verdict(80.0, 70.0, 4.9) == "reproduces"
    assert verdict(70.0, 80.0, 4.9) == "refutes"
    assert verdict(80.0, 70.0, 5.1).startswith("cannot tell (gap 10.0 within 2 standard errors, 10.2)")
    assert verdict(10.0, 20.0, 1.0, higher_is_better=False) == "reproduces"  # e.g. FPR95: lower is better
    assert verdict(99.0, 1.0, None) == "cannot tell (one seed: no error bar)"


def test_standard_errors_by_hand():
    assert seeds_standard_error(2.0, 4, 4.0, 4) == pytest.approx(math.sqrt(4 / 4 + 16 / 4))
    assert seeds_standard_error(2.0, 1, 4.0, 4) is None
    # 50% vs 30% error on 100 images: sqrt((.25 + .21) / 100) = 6.78 points
    assert rates_standard_error(50.0, 30.0, 100) == pytest.approx(100 * math.sqrt(0.46 / 100))


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
