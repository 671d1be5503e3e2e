"""Report sections of the downstream stages: each stage writes ``reports/<stage>/index.md`` and its figures
beside it, and the robustness report links them. Tables and figures only; every number comes from the stage's
metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluators.report import md_table, png_bytes  # noqa: E402


def _write(report_dir: Path, stage: str, markdown: str, figures: dict[str, bytes]) -> str:
    folder = report_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in figures.items():
        (folder / name).write_bytes(data)
    (folder / "index.md").write_text(markdown)
    return markdown


def _adv_curves(histories: dict[str, list[dict[str, Any]]], events: dict[str, list[dict]]) -> bytes:
    fig, axes = plt.subplots(2, len(histories), figsize=(4.2 * len(histories), 6), squeeze=False, sharex="col")
    for j, (name, rows) in enumerate(histories.items()):
        steps = [r["step"] for r in rows]
        top, bottom = axes[0, j], axes[1, j]
        for key, label in [("train_pgd_acc", "PGD acc (train batch)"), ("val_pgd_acc", "PGD acc (val subset)"),
                           ("train_fgsm_acc", "FGSM acc (train batch)"), ("train_clean_acc", "clean acc (train batch)")]:
            top.plot(steps, [r[key] for r in rows], label=label)
        bottom.plot(steps, [r["train_self_info_acc_proxy"] for r in rows], label="self-information proxy (acc %)")
        bottom.plot(steps, [100 * r["train_channel_share_fgsm_proxy"] for r in rows], label="top-10% channel share, FGSM (%)")
        bottom.plot(steps, [100 * r["train_channel_share_clean_proxy"] for r in rows], label="top-10% channel share, clean (%)")
        for e in events.get(name, []):
            for ax in (top, bottom):
                ax.axvline(e["step"], color="red", linestyle="--", linewidth=1)
        top.set_title(f"{name}" + (f" — {len(events.get(name, []))} CO event(s)" if events.get(name) else " — no CO flagged"))
        top.set_ylim(0, 100)
        bottom.set_xlabel("training step")
        if j == 0:
            top.set_ylabel("accuracy (%)")
            bottom.set_ylabel("proxy (%)")
            top.legend(fontsize=6)
            bottom.legend(fontsize=6)
    return png_bytes(fig)


def adv_training_section(metrics: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, Any]]],
                         cfg: dict[str, Any], report_dir: Path) -> str:
    events = {n: m["co_events"] for n, m in metrics.items()}
    rows = []
    for name, m in metrics.items():
        h = histories[name]
        peak = max(h, key=lambda r: r["train_pgd_acc"])
        rows.append([name, m["method"], f"{m['eps']}/255", m["val_acc"], m["final_val_pgd_acc"], m["final_val_fgsm_acc"],
                     f"{peak['train_pgd_acc']:.1f} @ {peak['step']}", f"{h[-1]['train_pgd_acc']:.1f}",
                     f"{h[0]['train_self_info_acc_proxy']:.1f} -> {h[-1]['train_self_info_acc_proxy']:.1f}",
                     ", ".join(f"step {e['step']}" for e in m["co_events"]) or "none", m["train_seconds"]])
    mon = cfg["monitor"]
    md = (
        "# Adversarial training and catastrophic overfitting\n\n"
        f"Checks every {mon['every']} steps on a fixed training batch and a fixed validation subset ({mon['n']} images "
        f"each): PGD-{mon['pgd_steps']} (step eps/4, random start) and FGSM accuracy. CO is flagged when PGD accuracy on "
        f"the training batch falls by more than {mon['threshold']} points since the previous check while FGSM accuracy "
        "rises. The self-fitting quantities are **proxies** (the paper's exact metrics are unpublished): accuracy on the "
        "FGSM perturbation alone on a grey image, and the share of activation mass in the top 10% of channels of the "
        "first two conv layers. Robustness on the clean/AoA/PGD shard sets: the `at-*` rows of the evaluate stage.\n\n"
        + md_table(["run", "method", "eps", "val acc", "val PGD acc (last)", "val FGSM acc (last)",
                    "train PGD acc peak @ step", "train PGD acc last", "self-info proxy first -> last", "CO events",
                    "train s"], rows)
        + "\n\n![curves](curves.png)\n\nRed dashed lines: flagged CO events.\n"
    )
    return _write(report_dir, "adv_train", md, {"curves.png": _adv_curves(histories, events)})
