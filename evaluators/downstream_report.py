"""Report sections of the downstream stages: each stage writes ``reports/<stage>/index.md`` and its figures
beside it, and the robustness report links them. Tables and figures only; every number comes from the stage's
metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluators.claims import REFUTES, REPRODUCES, over_seeds_difference  # noqa: E402
from evaluators.pages import md_table, png_bytes  # noqa: E402
from evaluators.unlearning import CHANCE_MARGIN  # noqa: E402


def number(value: Any, digits: int = 1) -> Any:
    """The pages' one number format: percentages and seconds to one decimal, divergences to three; others as given."""
    return f"{value:.{digits}f}" if isinstance(value, float) else value


def settings(options: dict[str, Any]) -> str:
    """A parameter dict as words for a heading: ``epochs 3, lr 0.05`` (nested dicts inline), never a Python repr."""
    return ", ".join(f"{k} {settings(v) if isinstance(v, dict) else v}" for k, v in options.items())


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


def co_events_cell(m: dict[str, Any]) -> str:
    """The CO events of a run, each with the step a rollback went back to, and the step the run ended on."""
    cell = ", ".join(f"step {e['step']}" + (f" (back to step {e['restored_step']})" if "restored_step" in e else "")
                     for e in m["co_events"]) or "none"
    return cell + (f"; ends on step {m['kept_step']}" if "kept_step" in m else "")


def adv_training_section(metrics: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, Any]]], mon,
                         fe, report_dir: Path, chance: float | None = None) -> str:
    """``mon``, ``fe``: the stage's monitor and final-eval settings (``adv_train.monitor``, ``adv_train.final_eval``,
    None when there is no final check); ``chance``: the accuracy of guessing (100 / classes); a run whose val
    accuracy is within ``CHANCE_MARGIN`` points of it learned nothing, is named as such and is left out of the seed
    claim."""
    events = {n: m["co_events"] for n, m in metrics.items()}
    at_chance = set() if chance is None else {n for n, m in metrics.items() if m["val_acc"] <= chance + CHANCE_MARGIN}
    white_box = f"white-box PGD-{fe.pgd_steps} x{fe.restarts} val acc" if fe else None
    rows = []
    for name, m in metrics.items():
        h = histories[name]
        peak = max(h, key=lambda r: r["train_pgd_acc"])
        label = f"{name} (at chance: not ranked)" if name in at_chance else name
        rows.append([label, m["method"], f"{m['eps']}/255",
                     *(number(m[k]) for k in ("val_acc", "final_val_pgd_acc", "final_val_fgsm_acc"))]
                    + ([number(m["white_box_val_acc"])] if fe else [])
                    + [f"{peak['train_pgd_acc']:.1f} @ {peak['step']}", f"{h[-1]['train_pgd_acc']:.1f}",
                       f"{h[0]['train_self_info_acc_proxy']:.1f} -> {h[-1]['train_self_info_acc_proxy']:.1f}",
                       co_events_cell(m), number(m["train_seconds"])])
    md = (
        "# Adversarial training and catastrophic overfitting\n\n"
        f"Checks every {mon.every} steps on a fixed training batch and a fixed validation subset ({mon.n} images "
        f"each): PGD-{mon.pgd_steps} (step eps/4, random start) and FGSM accuracy. CO is flagged when PGD accuracy on "
        f"the training batch has lost {mon.drop:.0%} of its running peak (and at least {mon.min_drop} points) "
        "while FGSM accuracy fell by less than half as much. The self-fitting quantities are **proxies** (the paper's exact metrics are unpublished): accuracy on the "
        "FGSM perturbation alone on a grey image, and the share of activation mass in the top 10% of channels of the "
        "first two conv layers. Robustness on the clean/AoA/PGD shard sets: the `at-*` rows of the evaluate stage.\n\n"
        + (f"Final white-box check of each trained model at its own eps: PGD-{fe.pgd_steps} (step eps/4) with "
           f"{fe.restarts} random restart(s) on {fe.n or 'all'} val images; an image counts as robust only if "
           "no iterate of any restart misclassifies it.\n\n" if fe else "")
        + md_table(["run", "method", "eps", "val acc", "val PGD acc (final model)", "val FGSM acc (final model)"]
                   + ([white_box] if fe else [])
                   + ["train PGD acc peak @ step", "train PGD acc last", "self-info proxy first -> last", "CO events",
                      "train s"], rows)
        + "\n\n![curves](curves.png)\n\nRed dashed lines: flagged CO events.\n"
    )
    learned = {n: m for n, m in metrics.items() if n not in at_chance}
    md += "\n" + _co_claim(learned) + "\n\n" + _self_info_control(metrics, histories) + "\n"
    return _write(report_dir, "adv_train", md, {"curves.png": _adv_curves(histories, events)})


def _co_claim(metrics: dict[str, dict[str, Any]]) -> str:
    """The CO papers' claim: plain FGSM training collapses; N-FGSM, GradAlign (and PGD-AT) do not."""
    plain = [n for n, m in metrics.items() if m["method"] == "fgsm"]
    guarded = [n for n, m in metrics.items() if m["method"] in ("n-fgsm", "gradalign", "pgd-at")]
    if not plain or not guarded:
        return "**Seed claim** (FGSM collapses, N-FGSM / GradAlign do not): cannot tell (no run of each kind)."
    collapsed = {n: bool(metrics[n]["co_events"]) for n in plain + guarded}
    if not any(collapsed[n] for n in plain):
        gaps = {n: round(metrics[n]["final_val_fgsm_acc"] - metrics[n]["final_val_pgd_acc"], 1) for n in plain + guarded}
        result = ("cannot tell: plain FGSM did not collapse from a robust peak in this setting, so there was nothing "
                  "to avoid (final val FGSM minus PGD accuracy, points: "
                  + ", ".join(f"{n} {g}" for n, g in gaps.items()) + ")")
    elif any(collapsed[n] for n in guarded):
        result = REFUTES + ": " + ", ".join(n for n in guarded if collapsed[n]) + " collapsed too"
    else:
        result = REPRODUCES
    runs = ", ".join(f"{n} {'CO' if c else 'no CO'}" for n, c in collapsed.items())
    seeds = sorted({m.get("seed", 0) for m in metrics.values()})
    seeds = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))
    return f"**Seed claim** (FGSM collapses, N-FGSM / GradAlign do not; {seeds}): {result} ({runs})."


def _self_info_control(metrics: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, Any]]]) -> str:
    """The self-fitting account predicts the proxies rise with CO; the runs without CO are the control."""
    rows, last = [], {}
    for name, m in metrics.items():
        h = histories[name][-1]
        last[name] = (h["train_self_info_acc_proxy"], h["train_channel_share_fgsm_proxy"])
        rows.append([name, "CO" if m["co_events"] else "no CO", number(m["final_val_fgsm_acc"] - m["final_val_pgd_acc"]),
                     f"{histories[name][0]['train_self_info_acc_proxy']:.1f} -> {h['train_self_info_acc_proxy']:.1f}",
                     f"{100 * h['train_channel_share_fgsm_proxy']:.1f}"])
    co = [n for n, m in metrics.items() if m["co_events"]]
    calm = [n for n in metrics if n not in co]
    table = md_table(["run", "detector", "val FGSM - PGD acc (final model)", "self-info proxy first -> last",
                      "top-10% channel share on FGSM inputs, % (last)"], rows)
    if not co or not calm:
        verdict_line = ("cannot tell whether the proxies separate CO from non-CO runs: "
                        + ("no run collapsed" if not co else "every run collapsed") + " in this setting")
    else:
        parts = []
        for i, label in enumerate(["self-information proxy", "channel share"]):
            separated = min(last[n][i] for n in co) > max(last[n][i] for n in calm)
            parts.append(f"the {label} {'is higher in every CO run than in any run without CO' if separated else 'does not separate CO runs from the others'}")
        verdict_line = "; ".join(parts)
    return ("**Control for the self-fitting proxies**: the same proxies in the runs without CO (last check). "
            f"Result: {verdict_line}.\n\n" + table)


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


def _orthloss_claim(methods: dict[str, Any], sets: list[str]) -> str:
    """OrthLoss's claim: lower FPR95 than OE, per test set, judged over seeds."""
    if "orthloss" not in methods or "oe" not in methods:
        return "**Seed claim** (OrthLoss detects OOD better than OE): cannot tell (needs both methods)."
    a, b = methods["orthloss"], methods["oe"]
    lines = []
    for s in sets:
        fa, fb = a["sets"][s]["fpr95"], b["sets"][s]["fpr95"]
        compared = over_seeds_difference(fa["mean"], fa["std"], a["seeds"], fb["mean"], fb["std"], b["seeds"])
        lines.append(f"- {s}: FPR95 {number(fa['mean'])} vs {number(fb['mean'])}: {compared.verdict(higher_is_better=False)}")
    return "**Seed claim** (OrthLoss detects OOD better than OE, lower FPR95), over seeds:\n\n" + "\n".join(lines)


def ood_section(metrics: dict[str, Any], scores: dict[str, dict[str, dict[str, Any]]], id_classes: list[int] | None,
                report_dir: Path) -> str:
    methods = metrics["methods"]
    sets = list(next(iter(methods.values()))["sets"])

    def cell(v: dict[str, float]) -> str:
        return f"{v['mean']:.1f}" + (f" ± {v['std']:.1f}" if v["std"] else "")

    rows = [[name + (" (no fine-tuning)" if name == "baseline" else ""), m["score"], m["seeds"], cell(m["id_acc"])]
            + [f"{cell(m['sets'][s]['fpr95'])} / {cell(m['sets'][s]['auroc'])}" for s in sets]
            for name, m in methods.items()]
    searched = metrics.get("margin_search", {})
    search_md = "".join(
        f"\n\n{n}: margins chosen on held-out ID training images vs held-out auxiliary outliers (energy FPR95), "
        f"around the base model's median ID energy {r['median_id_energy']}: m_in = {r['m_in']}, m_out = {r['m_out']} "
        "(searched with seed " + str(metrics["seeds"][0]) + "; every seed then trains with them).\n\n"
        + md_table(["m_in", "m_out", "val FPR95", "val AUROC"],
                   [[c["m_in"], c["m_out"], number(c["fpr95"]), number(c["auroc"])] for c in r["candidates"]])
        for n, r in searched.items())
    md = (
        "# OOD fine-tuning\n\n"
        f"Positive class: **{metrics['positive']}** (the OE/OrthLoss papers' convention; OpenOOD and pytorch-ood "
        "take OOD as positive, which swaps AUPR-in and AUPR-out). Each method is read with its own score; "
        "`metrics/downstream/ood.json` has every score (MSP, energy, max logit, OrthLoss) and AUPR-in/out for every method and "
        f"set (first seed). ID classes: {id_classes or 'all'}. Fine-tuned methods: mean ± sample std over "
        f"seeds {metrics['seeds']}; the ROC curves are the first seed's.\n\n"
        "FPR95 (lower is better) / AUROC (higher is better), in %:\n\n"
        + md_table(["method", "score", "seeds", "ID acc"] + sets, rows)
        + search_md
        + "\n\n" + _orthloss_claim(methods, sets)
        + "\n\n![ROC curves](roc.png)\n"
    )
    return _write(report_dir, "ood", md, {"roc.png": _roc_figure(scores, metrics)})


DIVERGENCES = ("KL", "JS")  # small numbers: three decimals


def _mean_std(r: dict[str, Any], key: str) -> Any:
    """A metric as ``mean ± std`` when it was measured over several seeds; a metric at chance as such."""
    if r.get(key) is None:
        return "n/a (attack at chance)" if key in r else ""
    digits = 3 if key in DIVERGENCES else 1
    if r.get("seeds", 1) > 1:
        return f"{float(r[key]):.{digits}f} ± {float(r[f'{key}_std']):.{digits}f}"
    return number(float(r[key]), digits)


def scenario_title(name: str, scenario) -> str:
    """``random-10: forget a random 10% of the training images``; ``class-0: forget class 0``."""
    if scenario.kind == "random":
        return f"{name}: forget a random {scenario.fraction:.0%} of the training images"
    return f"{name}: forget every training image of class {scenario.class_}"


def unlearning_section(results: dict[str, dict[str, dict[str, float]]], cfg, report_dir: Path) -> str:
    """``cfg``: the unlearn section of the parameters (its scenarios, seeds and MIA attack)."""
    md = ["# Machine unlearning\n",
          "UA = 100 - forget accuracy, RA / TA = remaining / test accuracy, MIA = SalUn's MIA-efficacy (share of "
          "forget samples a confidence attack fit on remaining vs test calls non-member; higher = more forgotten), "
          "MIA-member = the entropy attack's member rate (lower = more forgotten). Avg Gap = mean |metric - retrain| "
          "over UA, RA, TA, MIA (lower is better); KL/JS: forget-set outputs against the retrained model's. "
          "For a class scenario TA covers the other classes. MIA attack acc: the confidence attack's balanced accuracy "
          f"on remaining vs test ({cfg.mia_attack}); within {CHANCE_MARGIN:g} points of 50% its "
          "verdicts on the forget set carry no information, so MIA is n/a and left out of Avg Gap. "
          f"Methods: mean ± sample std over seeds {cfg.seeds} (the original, the split "
          "and the retrained reference are one model each).\n"]
    keys = ["UA", "RA", "TA", "MIA", "MIA_member_rate", "MIA_attack_acc", "avg_gap", "KL", "JS", "seconds"]
    for scenario, rows in results.items():
        md.append(f"## {scenario_title(scenario, cfg.scenarios[scenario])}\n")
        md.append(md_table(["method", "UA", "RA", "TA", "MIA", "MIA-member", "MIA attack acc", "Avg Gap", "KL", "JS",
                            "time (s)"], [[n] + [_mean_std(r, k) for k in keys] for n, r in rows.items()]) + "\n")
    md.append(_unlearning_claim(results))
    return _write(report_dir, "unlearn", "\n".join(md), {})


def _unlearning_claim(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """NatMU, SFR-on and MUSO's claim: closer to retraining (lower Avg Gap) than plain fine-tuning, over seeds."""
    lines = []
    for scenario, rows in results.items():
        if "ft" not in rows:
            continue
        ft = rows["ft"]
        for m in ("natmu", "sfr-on", "muso"):
            if m in rows:
                r = rows[m]
                compared = over_seeds_difference(r["avg_gap"], r.get("avg_gap_std") or 0.0, r.get("seeds", 1),
                                                 ft["avg_gap"], ft.get("avg_gap_std") or 0.0, ft.get("seeds", 1))
                lines.append(f"- {scenario}, {m} vs ft: Avg Gap {_mean_std(r, 'avg_gap')} vs {_mean_std(ft, 'avg_gap')}: "
                             + compared.verdict(higher_is_better=False))
    return ("**Seed claims** (NatMU, SFR-on, MUSO get closer to retraining than fine-tuning):\n\n"
            + ("\n".join(lines) or "cannot tell (no fine-tuning baseline in this run)") + "\n")


def optim_section(metrics: dict[str, Any], cfg, report_dir: Path) -> str:
    """``cfg``: the optim section of the parameters (its recipe and LoRA settings)."""
    def rows(runs):
        return [[n, r.get("seeds", 1), *(_mean_std(r, k) for k in ("val_acc", "train_acc", "clean", "aoa")),
                 number(r["aoa"] - r["clean"]) if "aoa" in r and "clean" in r else "", number(r["train_seconds"])]
                for n, r in runs.items()]

    header = ["run", "seeds", "val acc", "train acc", "acc on clean shards", "acc on AoA shards", "change under AoA",
              "train s"]
    noise = (f" Training labels: {metrics['label_noise']:.0%} replaced by a random other class (train acc is on "
             "those labels: memorisation)." if metrics.get("label_noise") else "")
    md = (
        "# Optimisers: SGD vs SAM vs F-SAM, LoRA vs Flat-LoRA\n\n"
        f"## From scratch, same epochs and schedule ({settings(cfg.recipe.given())})\n\n"
        "SAM and F-SAM take two forward/backward passes per step (about twice the compute of SGD). Mean ± sample std "
        f"over seeds {metrics['seeds']}.{noise}\n\n"
        + md_table(header, rows(metrics["optimizers"]))
        + f"\n\n## Adapting the zoo model to a shifted split ({settings(cfg.lora.shift.model_dump())}), "
        f"rank {cfg.lora.rank}, {cfg.lora.train_images} shifted training images, BatchNorm statistics "
        "frozen (only the adapters adapt)\n\n"
        f"Zoo model on the shifted val split before adaptation: {number(metrics['lora_base_shifted_val_acc'])}%. "
        "Val acc below is on the shifted val split; the shard sets are the unshifted clean/AoA sets.\n\n"
        + md_table(header, rows(metrics["lora"])) + "\n\n"
        + _flatness_claims(metrics) + "\n"
    )
    return _write(report_dir, "optim", md, {})


def _flatness_claims(metrics: dict[str, Any]) -> str:
    """SAM / F-SAM over SGD (over seeds) and Flat-LoRA over LoRA (one seed): higher validation accuracy."""
    opt, lora = metrics["optimizers"], metrics["lora"]
    lines = []
    for a, b in (("sam", "sgd"), ("fsam", "sgd"), ("fsam", "sam")):
        if a in opt and b in opt:
            compared = over_seeds_difference(opt[a]["val_acc"], opt[a]["val_acc_std"], opt[a]["seeds"],
                                             opt[b]["val_acc"], opt[b]["val_acc_std"], opt[b]["seeds"])
            lines.append(f"- {a} vs {b}: val acc {number(opt[a]['val_acc'])} vs {number(opt[b]['val_acc'])}: {compared.verdict()}")
    if "flat-lora" in lora and "lora" in lora:
        flat, plain = lora["flat-lora"], lora["lora"]
        compared = over_seeds_difference(flat["val_acc"], flat.get("val_acc_std", 0.0), flat.get("seeds", 1),
                                         plain["val_acc"], plain.get("val_acc_std", 0.0), plain.get("seeds", 1))
        lines.append(f"- flat-lora vs lora: val acc {number(flat['val_acc'])} vs {number(plain['val_acc'])}: {compared.verdict()}")
    return "**Seed claims** (flatter minima generalise better):\n\n" + ("\n".join(lines) or "cannot tell")
