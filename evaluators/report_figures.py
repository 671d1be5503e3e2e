"""The report's figures (PNG bytes): error bars per model and set, the RMSD distribution of every attack, and
examples with the surrogate's attention before and after AoA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.sglrp import SGLRP
from evaluators.claims import error_interval
from evaluators.pages import plt, png_bytes
from model_zoo.spec import ModelSpec
from model_zoo.zoo import build_model
from shards.shardset import iter_shardset


def error_bars(errors: dict[str, dict[str, float]], sets: list[str], records: list[dict[str, Any]]) -> bytes:
    """Top-1 error per model and set, with the exact 95% interval of each bar (the table's intervals)."""
    models = list(errors)
    n = {r["name"]: {s: a["n"] for s, a in r["accuracy"].items()} for r in records}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models)), 3.6))
    width = 0.8 / len(sets)
    for i, s in enumerate(sets):
        err = np.array([errors[m].get(s, np.nan) for m in models])
        ci = np.array([error_interval(round(n[m][s] * errors[m][s] / 100), n[m][s]) if s in errors[m] else
                       (np.nan, np.nan) for m in models])
        ax.bar(np.arange(len(models)) + i * width, err, width, label=s,
               yerr=np.abs(np.stack([err - ci[:, 0], ci[:, 1] - err])), error_kw={"elinewidth": 0.8, "capsize": 1.5})
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=30, ha="right")
    ax.set_ylabel("top-1 error (%), exact 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never over a bar
    ax.set_title("Clean vs adversarial error per model")
    fig.tight_layout()  # rotated labels stay inside the figure
    return png_bytes(fig)


def rmsd_distribution(rmsd: dict[str, list[float]], eta: float) -> bytes:
    """Every attack's RMSD as a cumulative distribution over the range the images take (a histogram from 0 put all
    of them in one bar under the budget, where every attack stops)."""
    fig, ax = plt.subplots(figsize=(7, 3))
    low = min(min(v) for v in rmsd.values())
    for name, values in rmsd.items():
        ax.step(np.sort(values), np.arange(1, len(values) + 1) / len(values), where="post", label=name)
    ax.axvline(eta, color="k", linestyle="--", label=f"budget {eta}")
    ax.set_xlim(low - 0.05 * (eta - low) - 1e-3, eta + 0.05 * (eta - low) + 1e-3)
    ax.set_xlabel("RMSD (0-255 scale)")
    ax.set_ylabel("share of images at most x")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return png_bytes(fig)


def attention_examples(clean_dir: Path, aoa_dir: Path, surrogate: ModelSpec, n: int, names: dict[int, str]) -> bytes:
    """Clean, AoA, the perturbation and the surrogate's SGLRP attention on the true class before and after, one
    image per class (up to ``n``)."""
    clean = {s["key"]: s for s in iter_shardset(clean_dir)}
    adv, classes = [], set()
    for s in iter_shardset(aoa_dir):  # one example per class, for variety
        if s["cls"] not in classes and len(adv) < n:
            adv.append(s)
            classes.add(s["cls"])
    model = build_model(surrogate)
    lrp = SGLRP(model)
    x0 = torch.stack([torch.from_numpy(clean[s["key"]]["image"].copy()) for s in adv]).permute(0, 3, 1, 2).float() / 255
    x1 = torch.stack([torch.from_numpy(s["image"].copy()) for s in adv]).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([s["cls"] for s in adv])
    with torch.no_grad():
        h0 = lrp.heatmaps(lrp(x0), [y])[0]
        h1 = lrp.heatmaps(lrp(x1), [y])[0]
    cols = ["clean", "AoA", "perturbation x10", "SGLRP true class, clean", "SGLRP true class, AoA"]
    fig, axes = plt.subplots(len(adv), 5, figsize=(11, 1.9 * len(adv)), squeeze=False)
    for i in range(len(adv)):
        # one scale per row, the row's largest relevance as 1: clean and AoA compare, and the bar needs no offset
        vmax = max(h0[i].max().item(), h1[i].max().item(), 1e-12)
        panels = [x0[i].permute(1, 2, 0), x1[i].permute(1, 2, 0),
                  ((x1[i] - x0[i]) * 10 + 0.5).clamp(0, 1).permute(1, 2, 0), h0[i] / vmax, h1[i] / vmax]
        for j, p in enumerate(panels):
            ax = axes[i, j]
            shown = ax.imshow(p.numpy(), cmap="hot" if j >= 3 else None, vmin=0, vmax=1 if j >= 3 else None,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        bar = fig.colorbar(shown, ax=axes[i, 3:].tolist(), fraction=0.05, pad=0.02, ticks=[0, 0.5, 1])
        bar.ax.tick_params(labelsize=7)
        bar.set_label("relevance / row max", fontsize=7)
        true, pred = adv[i]["cls"], adv[i]["json"]["pred_after"]
        axes[i, 0].set_ylabel(f"{adv[i]['key']}\n{names.get(true, true)} ({true})\n→ {names.get(pred, pred)} ({pred})",
                              fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
    return png_bytes(fig)
