"""Unlearning metrics: UA, RA, TA, MIA (two conventions, named), Avg Gap to the retrained model, and the forget
set's output divergence to the retrained model.

- UA = 100 - accuracy on the forget set; RA / TA = accuracy on the remaining / test set.
- ``mia_efficacy`` (SalUn's convention): an attack on the true-class confidence (as its log-odds), fit on
  remaining (member) vs test (non-member) samples only, balanced; the share of forget samples it calls
  *non-member*. Higher = more forgotten.
- ``mia_member_rate`` (the NatMU/SFR-on repos' convention): the same kind of attack on the prediction entropy (its log);
  the share of forget samples it calls *member*. Lower = more forgotten.
- The attack is a logistic regression (default) or SalUn's RBF SVC (``attack="svc"``), on float64 softmax
  outputs (in float32, confidences of a well-fit model round to exactly 1.0 and the attack degenerates).
- When the confidence attack cannot tell members from non-members (balanced accuracy within ``CHANCE_MARGIN``
  points of 50%), MIA-efficacy says nothing about forgetting: it is reported as ``None`` ("n/a, attack at
  chance") and left out of Avg Gap.
- Avg Gap: mean |metric - retrained metric| over UA, RA, TA and (when both are defined) MIA-efficacy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from training.supervised import predict

ATTACKS = ("logistic", "svc")
CHANCE_MARGIN = 5.0  # points of accuracy from chance (50% balanced for an attack) within which a model is at chance


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probs.argmax(1) == labels).float().mean().item()


def true_class_log_odds(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """log(p / (1 - p)) of the true-class confidence p: monotone in p, so a threshold on it is SalUn's confidence
    attack, but on a scale where a fitted attack converges (a well-fit model's p differ from 1 by 1e-8)."""
    p = probs.double().gather(1, labels[:, None]).squeeze(1).clamp(1e-300, 1 - 1e-16)
    return (p.log() - (-p).log1p()).numpy()


def log_entropy(probs: torch.Tensor, labels: torch.Tensor | None = None) -> np.ndarray:
    """log of the prediction entropy: monotone in the entropy (the NatMU/SFR-on feature), on a scale where a fitted
    attack converges for confident models."""
    p = probs.double()
    return (-(p * p.clamp_min(1e-300).log()).sum(1)).clamp_min(1e-300).log().numpy()


def fit_attack(member_feature: np.ndarray, nonmember_feature: np.ndarray, seed: int = 0, attack: str = "logistic"):
    """A classifier on one scalar feature (logistic regression, or SalUn's SVC: RBF kernel, C=3, gamma "auto");
    members are subsampled to the non-member count (balanced)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown MIA attack {attack!r}; known: {', '.join(ATTACKS)}")
    rng = np.random.default_rng(seed)
    n = min(len(member_feature), len(nonmember_feature))
    members = rng.choice(member_feature, n, replace=False)
    nonmembers = rng.choice(nonmember_feature, n, replace=False)
    x = np.concatenate([members, nonmembers])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    model = SVC(C=3, gamma="auto", kernel="rbf") if attack == "svc" else LogisticRegression()
    return model.fit(x, y)


def mia(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int = 0, attack: str = "logistic") -> dict[str, Any]:
    """Both MIA conventions from ``{"remain", "test", "forget"}: (probs, labels)``. The attacks never see the
    forget set; they are returned for inspection."""
    result = {}
    for name, feature, on_forget in (("mia_efficacy", true_class_log_odds, 0), ("mia_member_rate", log_entropy, 1)):
        members, nonmembers = feature(*outputs["remain"]), feature(*outputs["test"])
        attack_model = fit_attack(members, nonmembers, seed, attack)
        pred = attack_model.predict(feature(*outputs["forget"])[:, None])
        result[name] = round(100.0 * float(np.mean(pred == on_forget)), 2)
        result[f"{name}_attack"] = attack_model
        # how well the attack tells remaining from test at all (50% = chance: its verdict on the forget set is noise)
        hits = np.concatenate([attack_model.predict(members[:, None]) == 1,
                               attack_model.predict(nonmembers[:, None]) == 0])
        weights = np.concatenate([np.full(len(members), 0.5 / len(members)), np.full(len(nonmembers), 0.5 / len(nonmembers))])
        result[f"{name}_attack_balanced_acc"] = round(100.0 * float(np.sum(hits * weights)), 2)
    return result


def unlearning_metrics(model, forget, remain, test, seed: int = 0,
                       attack: str = "logistic") -> tuple[dict[str, float | None], torch.Tensor]:
    """The metrics of ``model`` and its forget-set probabilities (float64, for divergences to the retrained model)."""
    outputs = {k: (predict(model, x).double().softmax(1), y) for k, (x, y) in
               {"forget": forget, "remain": remain, "test": test}.items()}
    attacks = mia(outputs, seed, attack)
    attack_acc = attacks["mia_efficacy_attack_balanced_acc"]
    at_chance = abs(attack_acc - 50.0) < CHANCE_MARGIN
    metrics = {"UA": round(100 - _accuracy(*outputs["forget"]), 2), "RA": round(_accuracy(*outputs["remain"]), 2),
               "TA": round(_accuracy(*outputs["test"]), 2),
               "MIA": None if at_chance else attacks["mia_efficacy"],
               "MIA_member_rate": None if at_chance else attacks["mia_member_rate"],
               "MIA_attack_acc": attack_acc}
    return metrics, outputs["forget"][0]


def divergences(p_retrained: torch.Tensor, p_model: torch.Tensor) -> dict[str, float]:
    """Mean KL(retrained || model) and Jensen-Shannon divergence (nats) over the forget set."""
    p, q = p_retrained.double().clamp_min(1e-12), p_model.double().clamp_min(1e-12)
    m = (p + q) / 2
    kl = (p * (p / q).log()).sum(1)
    js = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    return {"KL": round(kl.mean().item(), 4), "JS": round(js.mean().item(), 4)}


def avg_gap(metrics: dict[str, float | None], retrained: dict[str, float | None]) -> float:
    """Mean absolute gap over UA, RA, TA and MIA; MIA only when both sides have one (its attack was not at chance)."""
    keys = [k for k in ("UA", "RA", "TA", "MIA") if metrics[k] is not None and retrained[k] is not None]
    return round(float(np.mean([abs(metrics[k] - retrained[k]) for k in keys])), 2)
