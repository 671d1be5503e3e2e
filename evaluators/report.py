"""The robustness report in four steps: load what the evaluate stage and the shards recorded, compute the numbers and
tests, render the page (the prose is ``templates/report.md.j2``; tables and figures come from here), write it.

The page: the threat model (surrogate, budget, every attack's options), images per set and the commit; then the
error of every model on every shard set; success rates in both conventions; clean vs adversarial error (bar chart);
the transfer matrix; AoA against each baseline at the same RMSD over the held-out victims, with paired tests; per
image on small sets; the RMSD distribution; examples with class names (clean, adversarial, perturbation amplified,
SGLRP heat map before and after); the published DAmageNet table joined with ours on ImageNet runs; links to this
run's downstream pages. Beside it: an HTML copy, RobustBench records per model and the downstream pages as HTML.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.budget import Budget
from evaluators import report_figures
from evaluators.claims import error_interval, format_p, paired_error_rates, paired_fooled_counts
from evaluators.pages import md_table, render_html, render_template
from evaluators.published import published_join, sanity_warnings
from model_zoo.spec import ModelSpec
from shards.shardset import class_names, shard_paths, shard_records

DOWNSTREAM = {"adv_train": "Adversarial training and catastrophic overfitting", "ood": "OOD fine-tuning",
              "unlearn": "Machine unlearning", "optim": "Optimisers: SAM, F-SAM, Flat-LoRA"}
PER_IMAGE_MAX = 30  # sets this small get a per-image table: every image is then worth reading


@dataclass(frozen=True)
class ReportInput:
    """What the report stage is given (:func:`pipelines.stages.report` builds it from the parameters)."""

    eval_dir: Path  # the evaluate stage's output
    shards_root: Path  # the attack sets' parent folder
    clean_dir: Path
    sets: list[str]  # ``clean`` and the attack sets, in the report's order
    surrogate: ModelSpec  # the run's surrogate
    budget: Budget
    out_dir: Path
    methods: dict[str, str]  # attack set -> the method it runs
    options: dict[str, dict[str, Any]]  # attack set -> its own options (the threat table)
    set_surrogates: dict[str, ModelSpec] = field(default_factory=dict)  # a set made on another model than the run's
    profile: str = "demo"
    examples: int = 4
    victims: list[str] | None = None  # the models the transfer tests may use (None: every evaluated model)
    downstream: list[str] | None = None  # this run's downstream stages (None: every stage with a page)
    downstream_dir: Path | None = None  # their pages, <stage>/index.md (None: <out_dir>/downstream)

    @property
    def attack_sets(self) -> list[str]:
        return [s for s in self.sets if s != "clean"]

    def surrogate_of(self, attack_set: str) -> ModelSpec:
        return self.set_surrogates.get(attack_set, self.surrogate)


@dataclass
class Loaded:
    records: list[dict[str, Any]]  # the evaluate stage's record per model
    candidates: list[str]  # the models the transfer tests may use
    labels: dict[str, int]  # image key -> label
    fooled: dict[str, dict[str, list[str]]]  # image key -> set -> candidates whose top-1 is wrong
    rmsd: dict[str, list[float]]  # attack set -> every image's RMSD (0-255)
    n_clean: int
    names: dict[int, str]  # class names


@dataclass
class Findings:
    errors: dict[str, dict[str, float]]  # model -> set -> top-1 error (%)
    made_on: dict[str, str]  # attack set -> the name of its surrogate
    groups: list[str]  # the surrogates, the run's first
    aoa_sets: list[str]
    transfer: list[dict[str, Any]]  # AoA vs each baseline of the same surrogate
    warnings: list[str]


def build_report(inp: ReportInput) -> dict[str, Any]:
    """Write report.md, report.html, figures/, robustbench/ and pages/ under ``inp.out_dir``; returns the numbers
    shown, the Markdown, and the Markdown with its figures inline (for a Prefect artifact)."""
    loaded = load(inp)
    findings = compute(inp, loaded)
    pages = downstream_pages(inp)
    markdown_text, figures = render(inp, loaded, findings, pages)
    write(inp, loaded, markdown_text, figures, pages)
    inline = re.sub(r"\]\(figures/([^)]+)\)", lambda m: "](data:image/png;base64,"
                    + base64.b64encode(figures[m.group(1)]).decode() + ")", markdown_text)
    return {"errors": findings.errors, "transfer": findings.transfer, "markdown": markdown_text,
            "markdown_inline": inline, "warnings": findings.warnings}


# ---- load ----------------------------------------------------------------------------------------------------------

def load(inp: ReportInput) -> Loaded:
    records = [json.loads(f.read_text()) for f in sorted((inp.eval_dir / "models").glob("*.json"))]
    candidates = [r["name"] for r in records if inp.victims is None or r["name"] in inp.victims]
    has_aoa = any(inp.methods.get(s) == "aoa" for s in inp.attack_sets)
    labels, fooled = per_image_fooled(inp.eval_dir, candidates, inp.sets) if has_aoa and candidates else ({}, {})
    rmsd = {a: [meta["rmsd"] for p in shard_paths(inp.shards_root / a) for _, _, meta in shard_records(p)]
            for a in inp.attack_sets}
    n_clean = json.loads((inp.clean_dir / "_info.json").read_text())["splits"]["validation"]["num_samples"]
    return Loaded(records, candidates, labels, fooled, rmsd, n_clean, class_names(inp.clean_dir))


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


# ---- compute -------------------------------------------------------------------------------------------------------

def compute(inp: ReportInput, loaded: Loaded) -> Findings:
    errors = error_table(loaded.records, inp.sets)
    made_on = {s: inp.surrogate_of(s).name for s in inp.attack_sets}
    aoa_sets = [s for s in inp.attack_sets if inp.methods[s] == "aoa"]
    # the run's surrogate first: its group is the one the per-image table follows
    groups = sorted(dict.fromkeys(made_on.values()), key=lambda name: name != inp.surrogate.name)
    transfer = []
    for made in groups:  # AoA against each baseline made on the same surrogate, on the models that are not it
        victims = [m for m in loaded.candidates if m != made]
        group_aoa = [s for s in aoa_sets if made_on[s] == made]
        baselines = [s for s in inp.attack_sets if made_on[s] == made and s not in aoa_sets]
        if group_aoa and victims:
            seen = {k: {s: [v for v in per_set[s] if v in victims] for s in per_set}
                    for k, per_set in loaded.fooled.items()}
            transfer += [{**t, "surrogate": made}
                         for t in transfer_comparison(errors, victims, group_aoa, baselines, seen)]
    archs = {r["name"]: r["arch"] for r in loaded.records}
    warnings = sanity_warnings(errors, archs, len(loaded.names), inp.profile == "imagenet")
    return Findings(errors, made_on, groups, aoa_sets, transfer, warnings)


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


def robustbench_record(record: dict[str, Any], sets: list[str], surrogate: ModelSpec, budget: Budget,
                       profile: str) -> dict[str, Any]:
    """One model's results in RobustBench's model-info schema (its ``model_info/<dataset>/<threat>/<name>.json``)
    where a field means the same here (accuracies as two-decimal strings, as RobustBench stores them; null where
    this run cannot know it). RobustBench's ``eps`` and ``autoattack_acc`` describe white-box AutoAttack at an L-inf
    radius; these are transfer attacks under an RMSD and an L-inf budget, so they get names of their own:
    ``transfer_acc`` per attack set, ``worst_transfer_acc``, and the threat model's ``transfer_rmsd`` /
    ``transfer_linf`` (0-255 scale) and ``surrogate``."""
    acc = {s: record["accuracy"][s]["top1"] for s in sets if s in record["accuracy"]}
    attacks = [s for s in acc if s != "clean"]
    timm_model = record.get("timm_model")
    return {
        "link": f"https://huggingface.co/timm/{timm_model}" if timm_model and "." in timm_model else None,
        "name": record["name"], "authors": None, "additional_data": None, "number_forward_passes": 1,
        "dataset": "imagenet" if profile == "imagenet" else profile, "venue": None,
        "architecture": timm_model or record["arch"],
        "clean_acc": f"{acc['clean']:.2f}" if "clean" in acc else None, "reported": None,
        "footnote": f"Transfer attacks made on {surrogate.name} (DAmageNet protocol), not white-box AutoAttack; "
                    f"{record['accuracy'].get('clean', {}).get('n')} images of the {profile} profile.",
        "threat_model": "transfer", "surrogate": surrogate.arch,
        "transfer_rmsd": budget.eta, "transfer_linf": budget.eps,
        "transfer_acc": {a: f"{acc[a]:.2f}" for a in attacks},
        "worst_transfer_acc": f"{min(acc[a] for a in attacks):.2f}" if attacks else None,
    }


# ---- render --------------------------------------------------------------------------------------------------------

def render(inp: ReportInput, loaded: Loaded, found: Findings,
           pages: list[dict[str, Any]]) -> tuple[str, dict[str, bytes]]:
    """The page's Markdown (from the template) and its figures."""
    figures = {"errors.png": report_figures.error_bars(found.errors, inp.sets, loaded.records),
               "rmsd.png": report_figures.rmsd_distribution(loaded.rmsd, inp.budget.eta)}
    if found.aoa_sets:
        figures["examples.png"] = report_figures.attention_examples(
            inp.clean_dir, inp.shards_root / found.aoa_sets[0], inp.surrogate_of(found.aoa_sets[0]), inp.examples,
            loaded.names)
    tables = Tables(inp, loaded, found)
    others = [m for m in found.groups if m != inp.surrogate.name] if len(found.groups) > 1 else []
    markdown_text = render_template(
        "report.md.j2", profile=inp.profile, warnings=found.warnings, surrogate=inp.surrogate,
        other_surrogates=others, budget=inp.budget, n_clean=loaded.n_clean, commit=_commit(),
        threat_table=tables.threat(), error_table=tables.errors(), real=tables.real(), success=tables.success(),
        matrix=tables.matrix(), transfer=tables.transfer(), per_image=tables.per_image(), rmsd_table=tables.rmsd(),
        examples_set=found.aoa_sets[0] if found.aoa_sets else None,
        published=tables.published() if inp.profile == "imagenet" else None, pages=pages)
    return markdown_text, figures


class Tables:
    """The page's tables, in Markdown, one method each (None where the page has no such section)."""

    def __init__(self, inp: ReportInput, loaded: Loaded, found: Findings):
        self.inp, self.loaded, self.found = inp, loaded, found
        self.by_name = {r["name"]: r for r in loaded.records}
        self.models, self.candidates = list(found.errors), loaded.candidates
        self.with_success = any(r.get("success") for r in loaded.records)

    def model_cell(self, m: str) -> str:
        r = self.by_name[m]
        kind = f"timm `{r['timm_model']}`" if r.get("timm_model") else f"custom, {r['param_count']:g} M params"
        role = ("surrogate" if m in self.found.groups else "transfer victim" if m in self.candidates
                else "not in the transfer tests")
        return f"{m} ({kind}; {role})"

    def threat(self) -> str:
        return md_table(["attack set", "method", "surrogate", "options", "images"],
                        [[a, self.inp.methods[a], self.found.made_on[a], _options(self.inp.options.get(a)),
                          len(self.loaded.rmsd[a])] for a in self.inp.attack_sets])

    def errors(self) -> str:
        top5 = {r["name"]: round(100 - r["accuracy"]["clean"]["top5"], 1)
                for r in self.loaded.records if "clean" in r["accuracy"]}
        return md_table(["model"] + self.inp.sets + ["clean top-5"],
                        [[self.model_cell(m)] + [error_cell(self.by_name[m], s) for s in self.inp.sets]
                         + [top5.get(m, "")] for m in self.models])

    def real(self) -> dict[str, Any] | None:
        n = max((a.get("real_n") or 0 for r in self.loaded.records for a in r["accuracy"].values()), default=0)
        return {"n": n, "table": md_table(["model"] + self.inp.sets, [
            [self.model_cell(m)] + [error_cell(self.by_name[m], s, real=True) for s in self.inp.sets]
            for m in self.models])} if n else None

    def success(self) -> dict[str, str] | None:
        """Both conventions, one table each: over all images, and over the images the model got right clean."""
        if not self.with_success:
            return None
        sets = self.inp.attack_sets
        tables = [md_table(["model"] + sets, [[self.model_cell(r["name"])] + [_rate(r["success"].get(s), kind)
                                                                              for s in sets]
                                              for r in self.loaded.records])
                  for kind in ("asr_all", "asr_correct")]
        counted = {r["name"]: r["success"][sets[0]]["asr_correct_n"] for r in self.loaded.records
                   if sets[0] in r["success"]}
        return {"over_all": tables[0], "over_correct": tables[1],
                "counted": ", ".join(f"{m} {k}" for m, k in counted.items())}

    def matrix(self) -> str | None:
        if not (self.with_success and self.candidates):
            return None
        made_on = self.found.made_on
        return md_table(["attack set", "surrogate"] + self.candidates, [
            [s, made_on[s]] + [_rate(self.by_name[m].get("success", {}).get(s), "asr_all", white_box=m == made_on[s])
                               for m in self.candidates] for s in self.inp.attack_sets])

    def transfer(self) -> dict[str, Any] | None:
        rows = self.found.transfer
        if not rows:
            return None
        overall = md_table(
            ["surrogate", "AoA set", "baseline", "AoA mean error", "baseline mean error", "victims where AoA is higher",
             "AoA - baseline, points [95% CI]", "sign test", "DAmageNet's claim (AoA transfers better)"],
            [[t["surrogate"], t["aoa"], t["baseline"], f"{t['aoa_mean_err']:.1f}", f"{t['baseline_mean_err']:.1f}",
              f"{t['aoa_wins']}/{t['victims']}", f"{c.difference:+.1f} [{c.low:+.1f}, {c.high:+.1f}]", format_p(c.p),
              c.outcome()] for t in rows for c in [t["overall"]]])
        per_victim = md_table(["surrogate", "AoA set", "baseline"] + self.candidates, [
            [t["surrogate"], t["aoa"], t["baseline"]] + [
                f"{c.difference:+.1f} ({format_p(c.p)}, {c.test})" if c else "white-box"
                for v in self.candidates for c in [t["per_victim"].get(v)]] for t in rows])
        return {"overall": overall, "per_victim": per_victim, "candidates": self.candidates, "comparisons": len(rows)}

    def per_image(self) -> dict[str, Any] | None:
        n, found, loaded = self.loaded.n_clean, self.found, self.loaded
        if not found.transfer or n > PER_IMAGE_MAX:
            return None
        victims = [m for m in self.candidates if m != found.groups[0]]
        shown = [s for s in self.inp.sets if s == "clean" or found.made_on[s] == found.groups[0]]
        low, high = error_interval(n // 2, n)
        table = md_table(["image", "true class"] + shown, [
            [key, f"{loaded.names.get(loaded.labels[key], loaded.labels[key])} ({loaded.labels[key]})"]
            + [sum(v in victims for v in loaded.fooled[key][s]) for s in shown] for key in sorted(loaded.fooled)])
        return {"victims": victims, "table": table, "half_low": low, "half_high": high}

    def rmsd(self) -> str:
        return md_table(["attack", "mean RMSD", "max RMSD", "images"],
                        [[a, round(float(np.mean(v)), 3), round(float(np.max(v)), 3), len(v)]
                         for a, v in self.loaded.rmsd.items()])

    def published(self) -> dict[str, Any]:
        rows, apart = published_join(self.found.errors, {r["name"]: r.get("timm_model") for r in self.loaded.records})
        return {"table": md_table(["victim (published)", "published clean err", "published DAmageNet err",
                                   "our model", "our clean err", "our AoA err"], rows),
                "apart": [(m, self.by_name[m]["arch"]) for m in apart]}


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


def _rate(rates: dict | None, kind: str, white_box: bool = False) -> str:
    """A success rate with its exact 95% interval; **wb** marks a white-box cell."""
    if not rates or rates[kind] is None:
        return ""
    low, high = rates[f"{kind}_ci"]
    return f"{rates[kind]:.1f} ({low:.1f}–{high:.1f})" + (" **wb**" if white_box else "")


def _options(options: dict[str, Any] | None) -> str:
    """An attack set's own options, or ``defaults``."""
    return ", ".join(f"{k} {v}" for k, v in sorted((options or {}).items())) or "defaults"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "not a git checkout"
    return " of ".join(out.stdout.split()) if out.returncode == 0 and out.stdout.strip() else "not a git checkout"


def downstream_pages(inp: ReportInput) -> list[dict[str, Any]]:
    """This run's downstream pages that exist: title, stage, the Markdown file and its path from the report."""
    stages = DOWNSTREAM if inp.downstream is None else {k: v for k, v in DOWNSTREAM.items() if k in inp.downstream}
    pages = []
    for stage, title in stages.items():
        page = (inp.downstream_dir or inp.out_dir / "downstream") / stage / "index.md"
        if page.is_file():  # rendered beside the report: the stage's own folder is that stage's output
            pages.append({"title": title, "stage": stage, "path": page,
                          "markdown": os.path.relpath(page, inp.out_dir)})
    return pages


# ---- write ---------------------------------------------------------------------------------------------------------

def write(inp: ReportInput, loaded: Loaded, markdown_text: str, figures: dict[str, bytes],
          pages: list[dict[str, Any]]) -> None:
    """The page (Markdown and HTML), its figures, a RobustBench record per model and the downstream pages; records
    and pages of an earlier run that this one has not are removed (they are not this run's results)."""
    out = inp.out_dir
    for folder in ("figures", "robustbench", "pages"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for name, data in figures.items():
        (out / "figures" / name).write_bytes(data)
    for stale in [*(out / "robustbench").glob("*.json"), *(out / "pages").glob("*.html")]:
        stale.unlink()
    for r in loaded.records:
        (out / "robustbench" / f"{r['name']}.json").write_text(json.dumps(
            robustbench_record(r, inp.sets, inp.surrogate, inp.budget, inp.profile), indent=2, sort_keys=True) + "\n")
    for p in pages:
        page = render_template("downstream_page.md.j2", page=p["path"].read_text())
        (out / "pages" / f"{p['stage']}.html").write_text(render_html(page, p["title"], p["path"].parent))
    # never an empty folder (DVC warns about an empty output): a profile without downstream stages says so
    (out / "pages" / "README.md").write_text(render_template("pages_readme.md.j2", pages=pages))
    (out / "report.md").write_text(markdown_text)
    (out / "report.html").write_text(render_html(markdown_text, "DAmageNet robustness report", out))
