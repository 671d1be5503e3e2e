"""The robustness report: Markdown, and the same text rendered to a self-contained HTML page (figures embedded as
data URIs) with the ``markdown`` library; the downstream stages' pages are rendered the same way.

Opening: the threat model (surrogate, budget, every attack's options), images per set, and the commit. Sections:
error of every model on every shard set; clean vs adversarial error per model (bar chart); AoA against each
baseline at the same RMSD over the held-out victims; RMSD histogram; examples with class names (clean,
adversarial, perturbation amplified, SGLRP heat map before and after); the published DAmageNet table joined with
ours model by model on ImageNet runs; links to this run's downstream pages.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import markdown
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.registry import attack_method  # noqa: E402
from attacks.sglrp import SGLRP  # noqa: E402
from evaluators.claims import error_interval, format_p, paired_error_rates, paired_fooled_counts  # noqa: E402
from model_zoo.zoo import build_model  # noqa: E402
from shards.shardset import class_names, iter_shardset, shard_paths, shard_records  # noqa: E402

PUBLISHED = Path(__file__).with_name("published_damagenet.csv")


def error_table(records: list[dict[str, Any]], sets: list[str]) -> dict[str, dict[str, float]]:
    """{model: {set: top-1 error}} from the evaluate stage's per-model records."""
    return {r["name"]: {s: round(100 - r["accuracy"][s]["top1"], 2) for s in sets if s in r["accuracy"]}
            for r in records}


def transfer_comparison(errors: dict[str, dict[str, float]], victims: list[str], aoa_sets: list[str],
                        baselines: list[str], fooled: dict[str, dict[str, list[str]]]) -> list[dict]:
    """Each AoA set against each baseline set on the same images (``fooled``: per image and set, the victims it
    fools): mean victim errors, on how many victims AoA is higher, the paired test over images across victims and
    the exact McNemar test per victim."""
    keys = sorted(fooled)

    def wrong(victim: str, attack: str) -> np.ndarray:
        return np.array([victim in fooled[k][attack] for k in keys])

    def fooled_count(attack: str) -> np.ndarray:
        return np.array([len(fooled[k][attack]) for k in keys])

    rows = []
    for a in aoa_sets:
        for b in baselines:
            aoa = [errors[v][a] for v in victims]
            base = [errors[v][b] for v in victims]
            rows.append({"aoa": a, "baseline": b, "aoa_mean_err": round(float(np.mean(aoa)), 2),
                         "baseline_mean_err": round(float(np.mean(base)), 2),
                         "aoa_wins": sum(x > y for x, y in zip(aoa, base)), "victims": len(victims),
                         "overall": paired_fooled_counts(fooled_count(a), fooled_count(b), len(victims)),
                         "per_victim": {v: paired_error_rates(wrong(v, a), wrong(v, b)) for v in victims}})
    return rows


PER_IMAGE_MAX = 30  # sets this small get a per-image table: every image is then worth reading


def per_image_fooled(eval_dir: Path, victims: list[str], sets: list[str]) -> tuple[dict, dict]:
    """({image key: label}, {image key: {set: victims whose top-1 is wrong}}) from the evaluate stage's per-sample
    predictions."""
    labels: dict[str, int] = {}
    fooled: dict[str, dict[str, list[str]]] = {}
    for v in victims:
        for s in sets:
            for line in (eval_dir / "predictions" / v / f"{s}.jsonl").read_text().splitlines():
                p = json.loads(line)
                labels[p["key"]] = p["label"]
                wrong = fooled.setdefault(p["key"], {}).setdefault(s, [])
                if p["top5"][0] != p["label"]:
                    wrong.append(v)
    return labels, fooled


def error_cell(record: dict[str, Any], s: str, real: bool = False) -> str:
    """Top-1 error (%) with its exact 95% interval, from the evaluate record of one set: against the label, or with
    ``real`` against the label sets (over the images that have one)."""
    acc = record["accuracy"].get(s)
    if acc is None:
        return ""
    top1, n = (acc.get("real_top1"), acc.get("real_n")) if real else (acc["top1"], acc["n"])
    if top1 is None or not n:
        return ""
    low, high = error_interval(round(n * (100 - top1) / 100), n)
    return f"{100 - top1:.1f} ({low:.1f}–{high:.1f})"


def robustbench_record(record: dict[str, Any], sets: list[str], surrogate: dict[str, Any], budget: dict[str, Any],
                       profile: str) -> dict[str, Any]:
    """One model's results in RobustBench's model-info schema (its ``model_info/<dataset>/<threat>/<name>.json``)
    where a field means the same here (accuracies as two-decimal strings, as RobustBench stores them; null where
    this run cannot know it). RobustBench's ``eps`` and ``autoattack_acc`` describe white-box AutoAttack at an L-inf radius; these are transfer attacks under an RMSD and
    an L-inf budget, so they get names of their own: ``transfer_acc`` per attack set, ``worst_transfer_acc``, and the
    threat model's ``transfer_rmsd`` / ``transfer_linf`` (0-255 scale) and ``surrogate``."""
    acc = {s: record["accuracy"][s]["top1"] for s in sets if s in record["accuracy"]}
    attacks = [s for s in acc if s != "clean"]
    timm_model = record.get("timm_model")
    out = {
        "link": f"https://huggingface.co/timm/{timm_model}" if timm_model and "." in timm_model else None,
        "name": record["name"], "authors": None, "additional_data": None, "number_forward_passes": 1,
        "dataset": "imagenet" if profile == "imagenet" else profile, "venue": None,
        "architecture": timm_model or record["arch"],
        "clean_acc": f"{acc['clean']:.2f}" if "clean" in acc else None, "reported": None,
        "footnote": f"Transfer attacks made on {surrogate['name']} (DAmageNet protocol), not white-box AutoAttack; "
                    f"{record['accuracy'].get('clean', {}).get('n')} images of the {profile} profile.",
        "threat_model": "transfer", "surrogate": surrogate["arch"],
        "transfer_rmsd": budget["eta"], "transfer_linf": budget["eps"],
        "transfer_acc": {a: f"{acc[a]:.2f}" for a in attacks},
        "worst_transfer_acc": f"{min(acc[a] for a in attacks):.2f}" if attacks else None,
    }
    return out


def _success_tables(records: list[dict[str, Any]], attack_sets: list[str], model_cell) -> str:
    """Both conventions, one table each: over all images, and over the images the model got right clean."""
    def cell(rates: dict | None, kind: str) -> str:
        if not rates or rates[kind] is None:
            return ""
        low, high = rates[f"{kind}_ci"]
        return f"{rates[kind]:.1f} ({low:.1f}–{high:.1f})"

    tables = [md_table(["model"] + attack_sets, [[model_cell(r["name"])] + [cell(r["success"].get(s), kind)
                                                                            for s in attack_sets] for r in records])
              for kind in ("asr_all", "asr_correct")]
    n = {r["name"]: r["success"][attack_sets[0]]["asr_correct_n"] for r in records if attack_sets[0] in r["success"]}
    return ("Transfer papers count an attack's success two ways (TransferAttack's issue #101). **Over all "
            "images** (TransferAttack's README tables, its 1,000 images): the share of the attack set the model "
            "misclassifies, which is its top-1 error above, clean mistakes included:\n\n" + tables[0] +
            "\n\n**Over the images the model classifies correctly clean** (the other convention; no credit for an "
            "image the model already got wrong): the share of those it misclassifies after the attack (images "
            "counted: " + ", ".join(f"{m} {k}" for m, k in n.items()) + "):\n\n" + tables[1] +
            "\n\nOn the surrogate these are white-box rates; on every other model, transfer rates.")


def _matrix_cell(rates: dict | None, white_box: bool) -> str:
    if not rates or rates["asr_all"] is None:
        return ""
    low, high = rates["asr_all_ci"]
    return f"{rates['asr_all']:.1f} ({low:.1f}–{high:.1f})" + (" **wb**" if white_box else "")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bar_chart(errors, sets, records) -> bytes:
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


def _rmsd_distribution(rmsd: dict[str, list[float]], eta: float) -> bytes:
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


def _examples(clean_dir: Path, aoa_dir: Path, surrogate: dict, n: int, names: dict[int, str]) -> bytes:
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


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table whose columns of numbers are right-aligned and the others left-aligned."""
    def numeric(column: int) -> bool:
        cells = [str(r[column]) for r in rows if str(r[column]) not in ("", "-")]
        return bool(cells) and all(re.match(r"[-+]?\d", c) for c in cells)

    lines = ["| " + " | ".join(header) + " |",
             "|" + "".join("---:|" if numeric(i) else ":---|" for i in range(len(header)))]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _published() -> list[dict[str, str]]:
    with open(PUBLISHED) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def published_join(errors: dict[str, dict[str, float]], timm_models: dict[str, str | None]
                   ) -> tuple[list[list[Any]], list[str]]:
    """The published table with our clean and AoA error beside each row, joined on the exact timm model
    (architecture and pretrained tag: other weights of a network are another model), one of ours per row at most;
    and our models no row names (or a second of ours with a row's model), to be listed apart."""
    ours: dict[str, str] = {}
    for m in errors:  # in the zoo's order: a second model of the same timm name is listed apart
        if timm_models.get(m) and timm_models[m] not in ours:
            ours[timm_models[m]] = m
    rows = []
    for r in _published():
        m = ours.get(r["timm_model"]) if r["timm_model"] else None
        rows.append([r["victim"], r["clean_top1_err"], r["damagenet_top1_err"],
                     f"{m} (`{timm_models[m]}`)" if m else "-", errors[m].get("clean", "-") if m else "-",
                     errors[m].get("aoa", "-") if m else "-"])
    joined = {m for m in ours.values() if m in {r[3].split(" ")[0] for r in rows}}
    return rows, [m for m in errors if m not in joined]


NEAR_CHANCE_ERR = 90.0  # clean top-1 error (%) at which a 1000-class model is suspect
PUBLISHED_MARGIN = 10.0  # points of clean error above the published number at which a model is suspect


def sanity_warnings(errors: dict[str, dict[str, float]], archs: dict[str, str], num_classes: int,
                    imagenet: bool) -> list[str]:
    """Models whose clean error says their weights or preprocessing are wrong: near chance on a 1000-class set, or
    (on ImageNet) 10 points worse than the published clean error of the same network."""
    published = {r["timm_model"]: float(r["clean_top1_err"]) for r in _published() if r["timm_model"]}
    warnings = []
    for m, e in errors.items():
        clean = e.get("clean")
        if clean is None:
            continue
        if num_classes >= 1000 and clean >= NEAR_CHANCE_ERR:
            warnings.append(f"{m}: clean top-1 error {clean}% on {num_classes} classes, near chance "
                            f"({100 - 100 / num_classes:.1f}%): wrong weights or preprocessing? Its other numbers "
                            "mean nothing until this is fixed.")
        pub = published.get(archs.get(m) or "") if imagenet else None
        if pub is not None and clean > pub + PUBLISHED_MARGIN:
            warnings.append(f"{m}: clean top-1 error {clean}% is {clean - pub:.1f} points above the published "
                            f"{pub}% for `{archs[m]}`: wrong weights, labels or preprocessing?")
    return warnings


def _commit() -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "not a git checkout"
    return " of ".join(out.stdout.split()) if out.returncode == 0 and out.stdout.strip() else "not a git checkout"


def _options(options: dict[str, Any] | None) -> str:
    """An attack set's own options (its method and surrogate have columns of their own)."""
    return ", ".join(f"{k} {v}" for k, v in sorted((options or {}).items())
                     if k not in ("attack", "surrogate")) or "defaults"


def render_html(md_text: str, title: str, base: Path) -> str:
    """Markdown to a self-contained HTML page: local images under ``base`` become data URIs."""
    body = markdown.markdown(md_text, extensions=["tables"])

    def inline(m: re.Match) -> str:
        path = base / m.group(1)
        if not path.is_file():
            return m.group(0)
        kind = "svg+xml" if path.suffix == ".svg" else path.suffix.lstrip(".").replace("jpg", "jpeg")
        return f'src="data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="(?!data:|https?:)([^"]+)"', inline, body)
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{title}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;"
            "padding:0 1em}table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
            "padding:3px 8px}img{max-width:100%}</style>"
            f"</head><body>\n{body}\n</body></html>\n")


DOWNSTREAM = {"adv_train": "Adversarial training and catastrophic overfitting", "ood": "OOD fine-tuning",
              "unlearn": "Machine unlearning", "optim": "Optimisers: SAM, F-SAM, Flat-LoRA"}


def build_report(eval_dir: str, shards_root: str, clean_dir: str, sets: list[str], surrogate: dict[str, Any],
                 budget: dict[str, Any], out_dir: str, profile: str = "demo", examples: int = 4,
                 victims: list[str] | None = None, attacks: dict[str, Any] | None = None,
                 downstream: list[str] | None = None, downstream_dir: str | None = None,
                 set_surrogates: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write report.md, report.html, figures/ and pages/<stage>.html (each downstream page, self-contained) under
    ``out_dir``; returns the numbers shown. ``budget``: eta, eps, alpha, max_steps on the 0-255 scale; ``attacks``:
    each attack's options; ``set_surrogates``: each attack set's surrogate spec (default ``surrogate``, the run's);
    ``victims``: the models the transfer tests may use (default: every evaluated model), each set's own surrogate
    left out of its tests; ``downstream``: the downstream stages of this run (pages of other runs are not linked),
    whose pages are ``<downstream_dir>/<stage>/index.md`` (default ``<out_dir>/downstream``)."""
    eval_path, out = Path(eval_dir), Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    records = [json.loads(f.read_text()) for f in sorted((eval_path / "models").glob("*.json"))]
    errors = error_table(records, sets)
    archs = {r["name"]: r["arch"] for r in records}
    adversarial = [s for s in sets if s != "clean"]
    methods = {s: attack_method(s, (attacks or {}).get(s)) for s in adversarial}
    aoa_sets = [s for s in adversarial if methods[s] == "aoa"]
    made_on = {s: (set_surrogates or {}).get(s, surrogate)["name"] for s in adversarial}
    surrogates = list(dict.fromkeys(made_on.values()))
    candidates = [m for m in errors if victims is None or m in victims]
    # the run's surrogate first: its group is the one the per-image table follows
    groups = sorted(surrogates, key=lambda name: name != surrogate["name"])
    first_victims = [m for m in candidates if m != groups[0]] if groups else candidates
    transfer, labels, fooled = [], {}, {}
    if aoa_sets and candidates:
        labels, fooled = per_image_fooled(eval_path, candidates, sets)
    for made in groups:  # AoA against each baseline made on the same surrogate, on the models that are not it
        group_victims = [m for m in candidates if m != made]
        group_aoa = [s for s in aoa_sets if made_on[s] == made]
        group_baselines = [s for s in adversarial if made_on[s] == made and s not in aoa_sets]
        if group_aoa and group_victims:
            seen = {k: {s: [v for v in per_set[s] if v in group_victims] for s in per_set}
                    for k, per_set in fooled.items()}
            transfer += [{**t, "surrogate": made} for t in transfer_comparison(errors, group_victims, group_aoa,
                                                                                group_baselines, seen)]
    rmsd = {a: [meta["rmsd"] for p in shard_paths(Path(shards_root) / a) for _, _, meta in shard_records(p)]
            for a in adversarial}
    n_clean = json.loads((Path(clean_dir) / "_info.json").read_text())["splits"]["validation"]["num_samples"]
    names = class_names(Path(clean_dir))
    figures = {
        "errors.png": _bar_chart(errors, sets, records),
        "rmsd.png": _rmsd_distribution(rmsd, budget["eta"]),
    }
    if aoa_sets:
        figures["examples.png"] = _examples(Path(clean_dir), Path(shards_root) / aoa_sets[0],
                                            (set_surrogates or {}).get(aoa_sets[0], surrogate), examples, names)
    for name, data in figures.items():
        (out / "figures" / name).write_bytes(data)
    (out / "robustbench").mkdir(exist_ok=True)
    for stale in (out / "robustbench").glob("*.json"):  # models of an earlier run are not this run's results
        stale.unlink()
    for r in records:
        (out / "robustbench" / f"{r['name']}.json").write_text(
            json.dumps(robustbench_record(r, sets, surrogate, budget, profile), indent=2, sort_keys=True) + "\n")

    by_name = {r["name"]: r for r in records}

    def model_cell(m: str) -> str:
        r = by_name[m]
        kind = f"timm `{r['timm_model']}`" if r.get("timm_model") else f"custom, {r['param_count']:g} M params"
        role = ("surrogate" if m in surrogates else "transfer victim" if m in candidates
                else "not in the transfer tests")
        return f"{m} ({kind}; {role})"

    top5 = {r["name"]: round(100 - r["accuracy"]["clean"]["top5"], 1) for r in records if "clean" in r["accuracy"]}
    sections = [
        ("Top-1 error (%) per model and shard set, with exact 95% intervals (and clean top-5 error)",
         md_table(["model"] + sets + ["clean top-5"],
                  [[model_cell(m)] + [error_cell(by_name[m], s) for s in sets] + [top5.get(m, "")] for m in errors]),
         None),
    ]
    real_n = max((a.get("real_n") or 0 for r in records for a in r["accuracy"].values()), default=0)
    if real_n:
        sections.append(("ReaL top-1 error (%): the top prediction against each image's set of acceptable classes",
                         md_table(["model"] + sets, [[model_cell(m)] + [error_cell(by_name[m], s, real=True)
                                                                        for s in sets] for m in errors]) + (
            f"\n\nThe label sets follow ImageNet-ReaL (Beyer et al. 2020; timm's `--real-labels`): a prediction counts "
            f"as right when it is any class of the image's set ({real_n} images have one; an image without a set is "
            "left out). A synonym class (tabby vs Egyptian cat) is an error against the single label and not here. "
            "AoA still stops on the single label, as the authors' attack does, and the transfer tests below use it."),
            None))
    if any(r.get("success") for r in records):
        sections.append(("Attack success rates (%), with exact 95% intervals", _success_tables(records, adversarial,
                                                                                                model_cell), None))
    sections.append(("Clean vs adversarial error", "", "errors.png"))
    if any(r.get("success") for r in records) and candidates:
        sections.append(("Transfer matrix: success rate over all images (%), attack set × model", md_table(
            ["attack set", "surrogate"] + candidates,
            [[s, made_on[s]] + [_matrix_cell(by_name[m].get("success", {}).get(s), m == made_on[s])
                                for m in candidates] for s in adversarial]) + (
            "\n\nA row is a set of images made on its surrogate; a column, a model evaluated on it. **wb** marks the "
            "white-box cell (the model the set was made on); every other cell is a transfer rate. Counted over all "
            "images, as TransferAttack's tables count them."), None))
    if transfer:
        overall = md_table(
            ["surrogate", "AoA set", "baseline", "AoA mean error", "baseline mean error", "victims where AoA is higher",
             "AoA - baseline, points [95% CI]", "sign test", "DAmageNet's claim (AoA transfers better)"],
            [[t["surrogate"], t["aoa"], t["baseline"], f"{t['aoa_mean_err']:.1f}", f"{t['baseline_mean_err']:.1f}",
              f"{t['aoa_wins']}/{t['victims']}",
              f"{c.difference:+.1f} [{c.low:+.1f}, {c.high:+.1f}]", format_p(c.p), c.outcome()]
             for t in transfer for c in [t["overall"]]])
        per_victim = md_table(
            ["surrogate", "AoA set", "baseline"] + candidates,
            [[t["surrogate"], t["aoa"], t["baseline"]] + [
                f"{c.difference:+.1f} ({format_p(c.p)}, {c.test})" if c else "white-box"
                for v in candidates for c in [t["per_victim"].get(v)]] for t in transfer])
        sections.append(("Transfer: AoA vs each baseline made on the same surrogate, at the same RMSD budget "
                         "(held-out victims)", overall + (
            f"\n\nEvery attack is run on the same {n_clean} images, so the comparison is paired. Across the "
            f"victims of a surrogate (every model of {', '.join(candidates)} but that surrogate) the image is the "
            "unit (the victims see the same images): an exact sign test on how many victims each image fools under "
            "AoA vs the baseline, and a "
            "paired bootstrap interval over images for the mean difference in error. \"reproduces\" / \"refutes\" "
            f"only when p < 0.05; each row is its own test, not corrected for the {len(transfer)} comparisons (Holm's "
            "correction would multiply the smallest p by that number).\n\n"
            "Per victim: AoA's error minus the baseline's, in points, with the exact McNemar test on the images only "
            "one of the two fools (AoA-only vs baseline-only images):\n\n") + per_victim, None))
    if transfer and n_clean <= PER_IMAGE_MAX:
        low, high = error_interval(n_clean // 2, n_clean)
        shown = [s for s in sets if s == "clean" or made_on[s] == groups[0]]  # the run surrogate's sets
        sections.append((f"Per image: victims fooled out of {len(first_victims)} ({', '.join(first_victims)})", md_table(
            ["image", "true class"] + shown,
            [[key, f"{names.get(labels[key], labels[key])} ({labels[key]})"]
             + [sum(v in first_victims for v in fooled[key][s]) for s in shown] for key in sorted(fooled)]) + (
            f"\n\nWith {n_clean} images, a victim that gets half of them wrong has an error rate anywhere in "
            f"{low:.1f}–{high:.1f}% (exact 95% interval), so the tables above can tell attacks apart only by large "
            "margins. What a set this small can show: whether images made on the surrogate fool other "
            "models at all, photo by photo, and what the attacks do to a real photograph (examples below); not "
            "which attack transfers better, unless the paired tests above say so."), None))
    sections.append((f"RMSD of the published images (budget {budget['eta']})", md_table(
        ["attack", "mean RMSD", "max RMSD", "images"],
        [[a, round(float(np.mean(v)), 3), round(float(np.max(v)), 3), len(v)] for a, v in rmsd.items()]), "rmsd.png"))
    if "examples.png" in figures:
        sections.append((f"Examples ({aoa_sets[0]}; surrogate's SGLRP attention on the true class; true -> "
                         "predicted after AoA)", "The two heat maps of a row share one colour scale (its colour bar), "
                         "so clean and attacked attention compare directly; rows are scaled separately.",
                         "examples.png"))
    if profile == "imagenet":
        rows, apart = published_join(errors, {r["name"]: r.get("timm_model") for r in records})
        sections.append(("Published DAmageNet (TPAMI 2020, Table 5) beside ours", md_table(
            ["victim (published)", "published clean err", "published DAmageNet err", "our model", "our clean err",
             "our AoA err"], rows) + "\n\nJoined on the exact timm model (architecture and pretrained tag). "
            + (f"Ours without a published row: {', '.join(f'{m} (`{archs[m]}`)' for m in apart)}." if apart
               else "Every model of ours has its published row."), None))
    else:
        sections.append(("Published DAmageNet", "The published numbers (ImageNet val, pretrained VGG19 surrogate, "
                         "224 px) cannot be compared with this profile: other images, classes and models.", None))

    stages = DOWNSTREAM if downstream is None else {k: v for k, v in DOWNSTREAM.items() if k in downstream}
    pages = []
    (out / "pages").mkdir(exist_ok=True)
    for stale in (out / "pages").glob("*.html"):  # a page of an earlier run must not stay linked or published
        stale.unlink()
    for stage, title in stages.items():
        page = Path(downstream_dir or out / "downstream") / stage / "index.md"
        if page.is_file():  # rendered here, beside the report: the stage's own folder is that stage's output
            back = "[← Robustness report](../report.html)\n\n"  # the page sits in pages/, beside the report's folder
            (out / "pages" / f"{stage}.html").write_text(render_html(back + page.read_text(), title, page.parent))
            pages.append((title, stage, page))
    # never an empty folder (DVC warns about an empty output): a profile without downstream stages says so
    (out / "pages" / "README.md").write_text(
        "# Downstream pages of this run\n\n" + ("".join(f"- [{t}]({s}.html)\n" for t, s, _ in pages) if pages
                                                 else "This profile runs no downstream stages.\n"))
    if pages:
        sections.append(("Downstream stages", "\n".join(
            f"- [{t}](pages/{s}.html) ([Markdown]({os.path.relpath(md, out)}))" for t, s, md in pages), None))
    threat = md_table(["attack set", "method", "surrogate", "options", "images"],
                      [[a, methods[a], made_on[a], _options((attacks or {}).get(a)), len(rmsd[a])]
                       for a in adversarial])
    warnings = sanity_warnings(errors, archs, len(names), profile == "imagenet")
    md = [f"# Robustness report ({profile} profile)\n",
          *(["**Sanity check failed**: " + " ".join(f"⚠ {w}" for w in warnings) + "\n"] if warnings else []),
          f"Surrogate `{surrogate['name']}` (timm `{surrogate['arch']}`)"
          + (f", and for the sets that name theirs: {', '.join(f'`{m}`' for m in surrogates if m != surrogate['name'])}"
             if len(surrogates) > 1 else "") + ". Every attack has the same threat model: "
          f"RMSD at most η = {budget['eta']} and L∞ at most ε = {budget['eps']} after rounding to uint8, step "
          f"α = {budget['alpha']} (0-255 scale), at most {budget.get('max_steps', '?')} steps. {n_clean} clean images.\n",
          threat + "\n",
          f"Code: commit {_commit()}. Metrics: `metrics/evaluate.json`; per-set CSVs (timm format) and per-model "
          "records in the evaluate outputs.\n"]
    for title, text, fig in sections:
        md.append(f"## {title}\n\n{text}\n" + (f"\n![{title}](figures/{fig})\n" if fig else ""))
    md_text = "\n".join(md)
    (out / "report.md").write_text(md_text)
    (out / "report.html").write_text(render_html(md_text, "DAmageNet robustness report", out))
    inline = re.sub(r"\]\(figures/([^)]+)\)", lambda m: "](data:image/png;base64,"
                    + base64.b64encode(figures[m.group(1)]).decode() + ")", md_text)
    return {"errors": errors, "transfer": transfer, "markdown": md_text, "markdown_inline": inline,
            "warnings": warnings}
