"""OOD detection metrics with the in-distribution class as positive (the OE/OrthLoss papers' convention;
OpenOOD and pytorch-ood take OOD as positive, which swaps AUPR-in and AUPR-out). Scores: higher = more ID.

- FPR95: share of OOD samples scoring at or above the highest threshold that keeps >= 95% of ID samples.
- AUROC: probability that an ID sample scores above an OOD one, ties counted one half.
- AUPR-in / AUPR-out: average precision (step-wise, as scikit-learn) with ID / OOD as positive.
"""

from __future__ import annotations

import math

import numpy as np

POSITIVE = "in-distribution"


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    k = math.ceil(tpr * len(id_scores))
    threshold = np.sort(id_scores)[::-1][k - 1]
    return float(np.mean(ood_scores >= threshold))


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Mann-Whitney U over average ranks (ties share their rank)."""
    values = np.concatenate([id_scores, ood_scores])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct value, ties averaged
    ranks = average_rank[inverse]
    n_id, n_ood = len(id_scores), len(ood_scores)
    return float((ranks[:n_id].sum() - n_id * (n_id + 1) / 2) / (n_id * n_ood))


def average_precision(positive: np.ndarray, negative: np.ndarray) -> float:
    """Sum over distinct thresholds (descending) of (recall step) x precision."""
    values = np.concatenate([positive, negative])
    is_pos = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    distinct, inverse = np.unique(-values, return_inverse=True)  # ascending in -score: descending score
    tp = np.cumsum(np.bincount(inverse, weights=is_pos, minlength=len(distinct)))
    seen = np.cumsum(np.bincount(inverse, minlength=len(distinct)))
    recall = tp / len(positive)
    return float(np.sum(np.diff(recall, prepend=0.0) * tp / seen))


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    id_scores, ood_scores = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError(f"OOD metrics need both sets: {len(id_scores)} ID and {len(ood_scores)} OOD scores")
    return {
        "fpr95": round(100 * fpr_at_tpr(id_scores, ood_scores), 2),
        "auroc": round(100 * auroc(id_scores, ood_scores), 2),
        "aupr_in": round(100 * average_precision(id_scores, ood_scores), 2),
        "aupr_out": round(100 * average_precision(-ood_scores, -id_scores), 2),
    }


def roc_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, for ROC figures."""
    thresholds = np.unique(np.concatenate([id_scores, ood_scores]))[::-1]
    tpr = np.array([np.mean(id_scores >= t) for t in thresholds])
    fpr = np.array([np.mean(ood_scores >= t) for t in thresholds])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])
