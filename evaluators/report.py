"""The robustness report: Markdown plus a self-contained HTML page (figures embedded as data URIs).

Sections: error of every model on every shard set; clean vs adversarial error per model (bar chart); AoA against
each baseline at the same RMSD over the held-out victims; RMSD histogram; examples (clean, adversarial,
perturbation amplified, SGLRP heat map before and after); the published DAmageNet table on ImageNet runs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.sglrp import SGLRP  # noqa: E402
from model_zoo.zoo import build_model  # noqa: E402
from shards.shardset import iter_shardset, shard_paths, shard_records  # noqa: E402

PUBLISHED = Path(__file__).with_name("published_damagenet.csv")


def error_table(eval_dir: Path, sets: list[str]) -> dict[str, dict[str, float]]:
    """{model: {set: top-1 error}} from the evaluate stage's per-model records."""
    table = {}
    for f in sorted((eval_dir / "models").glob("*.json")):
        rec = json.loads(f.read_text())
        table[rec["name"]] = {s: round(100 - rec["accuracy"][s]["top1"], 2) for s in sets if s in rec["accuracy"]}
    return table


def transfer_comparison(errors: dict[str, dict[str, float]], victims: list[str], attacks: list[str]) -> list[dict]:
    """Per baseline: mean victim error of AoA and of the baseline, and on how many victims AoA is higher."""
    rows = []
    for b in (a for a in attacks if a != "aoa"):
        aoa = [errors[v]["aoa"] for v in victims]
        base = [errors[v][b] for v in victims]
        rows.append({"baseline": b, "aoa_mean_err": round(float(np.mean(aoa)), 2),
                     "baseline_mean_err": round(float(np.mean(base)), 2),
                     "aoa_wins": sum(x > y for x, y in zip(aoa, base)), "victims": len(victims)})
    return rows


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bar_chart(errors, sets) -> bytes:
    models = list(errors)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models)), 3.6))
    width = 0.8 / len(sets)
    for i, s in enumerate(sets):
        ax.bar(np.arange(len(models)) + i * width, [errors[m].get(s, np.nan) for m in models], width, label=s)
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=20)
    ax.set_ylabel("top-1 error (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=len(sets))
    ax.set_title("Clean vs adversarial error per model")
    return png_bytes(fig)


def _rmsd_histogram(rmsd: dict[str, list[float]], eta: float) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, values in rmsd.items():
        ax.hist(values, bins=30, alpha=0.5, label=name)
    ax.axvline(eta, color="k", linestyle="--", label=f"budget {eta}")
    ax.set_xlabel("RMSD (0-255 scale)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def _examples(clean_dir: Path, aoa_dir: Path, surrogate: dict, n: int) -> bytes:
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
    fig, axes = plt.subplots(len(adv), 5, figsize=(8, 1.7 * len(adv)), squeeze=False)
    for i in range(len(adv)):
        vmax = max(h0[i].max().item(), h1[i].max().item(), 1e-12)
        panels = [x0[i].permute(1, 2, 0), x1[i].permute(1, 2, 0),
                  ((x1[i] - x0[i]) * 10 + 0.5).clamp(0, 1).permute(1, 2, 0), h0[i], h1[i]]
        for j, p in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(p.numpy(), cmap="hot" if j >= 3 else None, vmin=0, vmax=vmax if j >= 3 else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
        axes[i, 0].set_ylabel(f"{adv[i]['key']}\ny={adv[i]['cls']} -> {adv[i]['json']['pred_after']}", fontsize=6)
    return png_bytes(fig)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _published() -> list[list[str]]:
    with open(PUBLISHED) as f:
        rows = list(csv.reader(line for line in f if not line.startswith("#")))
    return rows[1:]


DOWNSTREAM = {"adv_train": "Adversarial training and catastrophic overfitting", "ood": "OOD fine-tuning",
              "unlearn": "Machine unlearning", "optim": "Optimisers: SAM, F-SAM, Flat-LoRA"}


def build_report(eval_dir: str, shards_root: str, clean_dir: str, sets: list[str], surrogate: dict[str, Any],
                 eta: float, out_dir: str, profile: str = "demo", examples: int = 4,
                 victims: list[str] | None = None) -> dict[str, Any]:
    """Write report.md, report.html and figures/ under ``out_dir``; returns the numbers shown. ``victims``: the
    models of the transfer comparison (default: every evaluated model but the surrogate)."""
    eval_path, out = Path(eval_dir), Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    errors = error_table(eval_path, sets)
    attacks = [s for s in sets if s != "clean"]
    victims = [m for m in errors if m != surrogate["name"] and (victims is None or m in victims)]
    transfer = transfer_comparison(errors, victims, attacks) if "aoa" in attacks and victims else []
    rmsd = {a: [meta["rmsd"] for p in shard_paths(Path(shards_root) / a) for _, _, meta in shard_records(p)]
            for a in attacks}
    figures = {
        "errors.png": _bar_chart(errors, sets),
        "rmsd.png": _rmsd_histogram(rmsd, eta),
    }
    if "aoa" in attacks:
        figures["examples.png"] = _examples(Path(clean_dir), Path(shards_root) / "aoa", surrogate, examples)
    for name, data in figures.items():
        (out / "figures" / name).write_bytes(data)

    main_rows = [[m + (" (surrogate)" if m == surrogate["name"] else "")] + [errors[m].get(s, "") for s in sets]
                 for m in errors]
    sections = [
        ("Top-1 error (%) per model and shard set", md_table(["model"] + sets, main_rows), None),
        ("Clean vs adversarial error", "", "errors.png"),
    ]
    if transfer:
        sections.append(("Transfer: AoA vs each baseline at the same RMSD budget (held-out victims)", md_table(
            ["baseline", "AoA mean error", "baseline mean error", "victims where AoA is higher"],
            [[t["baseline"], t["aoa_mean_err"], t["baseline_mean_err"], f"{t['aoa_wins']}/{t['victims']}"]
             for t in transfer]), None))
    sections.append((f"RMSD of the published images (budget {eta})", md_table(
        ["attack", "mean RMSD", "max RMSD", "images"],
        [[a, round(float(np.mean(v)), 3), round(float(np.max(v)), 3), len(v)] for a, v in rmsd.items()]), "rmsd.png"))
    if "examples.png" in figures:
        sections.append(("Examples (surrogate's SGLRP attention on the true class)", "", "examples.png"))
    if profile == "imagenet":
        sections.append(("Published DAmageNet (TPAMI 2020, Table 5), for comparison", md_table(
            ["victim", "clean top-1 err", "DAmageNet top-1 err"], _published()), None))

    pages = [(title, f"{stage}/index.md") for stage, title in DOWNSTREAM.items() if (out / stage / "index.md").is_file()]
    if pages:
        sections.append(("Downstream stages", "\n".join(f"- [{t}]({p})" for t, p in pages), None))
    md = [f"# Robustness report ({profile} profile)\n",
          f"Surrogate `{surrogate['name']}`; attacks share one budget (RMSD <= {eta}, 0-255 scale). "
          "Metrics: `metrics/evaluate.json`; per-set CSVs and per-model records in the evaluate outputs.\n"]
    body = []
    for title, table, fig in sections:
        md.append(f"## {title}\n\n{table}\n" + (f"\n![{title}](figures/{fig})\n" if fig else ""))
        img = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,'
               f'{base64.b64encode(figures[fig]).decode()}">' if fig else "")
        body.append(f"<h2>{html.escape(title)}</h2>\n{_html_table(table)}\n{img}")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>DAmageNet robustness report</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>Robustness report ({html.escape(profile)} profile)</h1>{''.join(body)}</body></html>\n")
    return {"errors": errors, "transfer": transfer, "markdown": "\n".join(md)}


def _html_table(md_table: str) -> str:
    if not md_table:
        return ""
    if md_table.startswith("- ["):  # a list of links: "- [title](path)"
        items = [line[3:-1].split("](") for line in md_table.splitlines()]
        return "<ul>" + "".join(f'<li><a href="{html.escape(p)}">{html.escape(t)}</a></li>' for t, p in items) + "</ul>"
    lines = [line.strip("|").split("|") for line in md_table.splitlines()]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in lines[2:])
    return f"<table><tr>{head}</tr>{rows}</table>"
