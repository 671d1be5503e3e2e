"""Unlearning metrics: UA, RA, TA, MIA (two conventions, named), Avg Gap to the retrained model, and the forget
set's output divergence to the retrained model.

- UA = 100 - accuracy on the forget set; RA / TA = accuracy on the remaining / test set.
- ``mia_efficacy`` (SalUn's convention): a logistic-regression attack on the true-class confidence, fit on
  remaining (member) vs test (non-member) samples only, balanced; the share of forget samples it calls
  *non-member*. Higher = more forgotten.
- ``mia_member_rate`` (the NatMU/SFR-on repos' convention): the same kind of attack on the prediction entropy;
  the share of forget samples it calls *member*. Lower = more forgotten.
- Avg Gap: mean |metric - retrained metric| over UA, RA, TA and MIA-efficacy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from model_zoo.training import predict


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probs.argmax(1) == labels).float().mean().item()


def true_class_confidence(probs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return probs.gather(1, labels[:, None]).squeeze(1).numpy()


def entropy(probs: torch.Tensor, labels: torch.Tensor | None = None) -> np.ndarray:
    return (-(probs * probs.clamp_min(1e-12).log()).sum(1)).numpy()


def fit_attack(member_feature: np.ndarray, nonmember_feature: np.ndarray, seed: int = 0) -> LogisticRegression:
    """Logistic regression on one scalar feature; members are subsampled to the non-member count (balanced)."""
    rng = np.random.default_rng(seed)
    n = min(len(member_feature), len(nonmember_feature))
    members = rng.choice(member_feature, n, replace=False)
    nonmembers = rng.choice(nonmember_feature, n, replace=False)
    x = np.concatenate([members, nonmembers])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    return LogisticRegression().fit(x, y)


def mia(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int = 0) -> dict[str, Any]:
    """Both MIA conventions from ``{"remain", "test", "forget"}: (probs, labels)``. The attacks never see the
    forget set; they are returned for inspection."""
    result = {}
    for name, feature, on_forget in (("mia_efficacy", true_class_confidence, 0), ("mia_member_rate", entropy, 1)):
        members, nonmembers = feature(*outputs["remain"]), feature(*outputs["test"])
        attack = fit_attack(members, nonmembers, seed)
        pred = attack.predict(feature(*outputs["forget"])[:, None])
        result[name] = round(100.0 * float(np.mean(pred == on_forget)), 2)
        result[f"{name}_attack"] = attack
        # how well the attack tells remaining from test at all (50% = chance: its verdict on the forget set is noise)
        hits = np.concatenate([attack.predict(members[:, None]) == 1, attack.predict(nonmembers[:, None]) == 0])
        weights = np.concatenate([np.full(len(members), 0.5 / len(members)), np.full(len(nonmembers), 0.5 / len(nonmembers))])
        result[f"{name}_attack_balanced_acc"] = round(100.0 * float(np.sum(hits * weights)), 2)
    return result


def unlearning_metrics(model, forget, remain, test, seed: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """The metrics of ``model`` and its forget-set probabilities (for divergences to the retrained model)."""
    outputs = {k: (predict(model, x).softmax(1), y) for k, (x, y) in
               {"forget": forget, "remain": remain, "test": test}.items()}
    attacks = mia(outputs, seed)
    metrics = {"UA": round(100 - _accuracy(*outputs["forget"]), 2), "RA": round(_accuracy(*outputs["remain"]), 2),
               "TA": round(_accuracy(*outputs["test"]), 2),
               "MIA": attacks["mia_efficacy"], "MIA_member_rate": attacks["mia_member_rate"],
               "MIA_attack_acc": attacks["mia_efficacy_attack_balanced_acc"]}
    return metrics, outputs["forget"][0]


def divergences(p_retrained: torch.Tensor, p_model: torch.Tensor) -> dict[str, float]:
    """Mean KL(retrained || model) and Jensen-Shannon divergence (nats) over the forget set."""
    p, q = p_retrained.double().clamp_min(1e-12), p_model.double().clamp_min(1e-12)
    m = (p + q) / 2
    kl = (p * (p / q).log()).sum(1)
    js = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    return {"KL": round(kl.mean().item(), 4), "JS": round(js.mean().item(), 4)}


def avg_gap(metrics: dict[str, float], retrained: dict[str, float]) -> float:
    return round(float(np.mean([abs(metrics[k] - retrained[k]) for k in ("UA", "RA", "TA", "MIA")])), 2)
