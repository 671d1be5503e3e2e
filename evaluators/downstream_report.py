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


def _roc_figure(scores: dict[str, dict[str, dict[str, Any]]], metrics: dict[str, Any]) -> bytes:
    from evaluators.ood import roc_points

    sets = [s for s in next(iter(scores.values())) if s != "id"]
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for name, per_set in scores.items():
            score = metrics["methods"][name]["score"]
            fpr, tpr = roc_points(per_set["id"][score], per_set[s][score])
            ax.plot(fpr, tpr, label=f"{name} ({score})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set_title(f"ID vs {s}", fontsize=9)
        ax.set_xlabel("FPR (OOD accepted)")
    axes[0, 0].set_ylabel("TPR (ID accepted)")
    axes[0, 0].legend(fontsize=6)
    return png_bytes(fig)


def ood_section(metrics: dict[str, Any], scores: dict[str, dict[str, dict[str, Any]]], cfg: dict[str, Any],
                report_dir: Path) -> str:
    methods = metrics["methods"]
    sets = list(next(iter(methods.values()))["sets"])
    rows = [[name + (" (no fine-tuning)" if name == "baseline" else ""), m["score"], m["id_acc"]]
            + [f"{m['sets'][s]['fpr95']:.1f} / {m['sets'][s]['auroc']:.1f}" for s in sets]
            for name, m in methods.items()]
    md = (
        "# OOD fine-tuning\n\n"
        f"Positive class: **{metrics['positive']}** (the OE/OrthLoss papers' convention; OpenOOD and pytorch-ood "
        "take OOD as positive, which swaps AUPR-in and AUPR-out). Each method is read with its own score; "
        "`metrics/ood.json` has every score (MSP, energy, max logit, OrthLoss) and AUPR-in/out for every method and "
        f"set. ID classes: {cfg['id_classes'] or 'all'}.\n\n"
        "FPR95 (lower is better) / AUROC (higher is better), in %:\n\n"
        + md_table(["method", "score", "ID acc"] + sets, rows)
        + "\n\n![ROC curves](roc.png)\n"
    )
    return _write(report_dir, "ood", md, {"roc.png": _roc_figure(scores, metrics)})


def unlearning_section(results: dict[str, dict[str, dict[str, float]]], cfg: dict[str, Any], report_dir: Path) -> str:
    md = ["# Machine unlearning\n",
          "UA = 100 - forget accuracy, RA / TA = remaining / test accuracy, MIA = SalUn's MIA-efficacy (share of "
          "forget samples a confidence attack fit on remaining vs test calls non-member; higher = more forgotten), "
          "MIA-member = the entropy attack's member rate (lower = more forgotten). Avg Gap = mean |metric - retrain| "
          "over UA, RA, TA, MIA (lower is better); KL/JS: forget-set outputs against the retrained model's. "
          "For a class scenario TA covers the other classes. MIA attack acc: the confidence attack's balanced accuracy "
          "on remaining vs test; near 50% its verdicts on the forget set carry no information.\n"]
    for scenario, rows in results.items():
        md.append(f"## {scenario} ({cfg['scenarios'][scenario]})\n")
        md.append(md_table(["method", "UA", "RA", "TA", "MIA", "MIA-member", "MIA attack acc", "Avg Gap", "KL", "JS",
                            "time (s)"],
                           [[n, r["UA"], r["RA"], r["TA"], r["MIA"], r["MIA_member_rate"], r["MIA_attack_acc"],
                             r["avg_gap"], r["KL"], r["JS"], r["seconds"]] for n, r in rows.items()]) + "\n")
    return _write(report_dir, "unlearn", "\n".join(md), {})


def optim_section(metrics: dict[str, Any], cfg: dict[str, Any], report_dir: Path) -> str:
    def rows(runs):
        return [[n, r["val_acc"], r["clean"], r["aoa"], round(r["aoa"] - r["clean"], 2), r["train_seconds"]]
                for n, r in runs.items()]

    header = ["run", "val acc", "acc on clean shards", "acc on AoA shards", "change under AoA", "train s"]
    md = (
        "# Optimisers: SGD vs SAM vs F-SAM, LoRA vs Flat-LoRA\n\n"
        f"## From scratch, same epochs and schedule ({cfg['recipe']})\n\n"
        "SAM and F-SAM take two forward/backward passes per step (about twice the compute of SGD).\n\n"
        + md_table(header, rows(metrics["optimizers"]))
        + f"\n\n## Adapting the zoo model to a shifted split ({cfg['lora']['shift']}), "
        f"rank {cfg['lora']['rank']}, {cfg['lora']['train_images']} shifted training images\n\n"
        f"Zoo model on the shifted val split before adaptation: {metrics['lora_base_shifted_val_acc']}%. "
        "Val acc below is on the shifted val split; the shard sets are the unshifted clean/AoA sets.\n\n"
        + md_table(header, rows(metrics["lora"])) + "\n"
    )
    return _write(report_dir, "optim", md, {})
