"""Evaluation against an independent loop, the per-model cache, clear errors, and the HTML report in a browser."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluators.classification import evaluate_shardset
from model_zoo.zoo import ModelSpec, build_model
from pipelines.config import Source
from pipelines.flows.evaluate import evaluate_flow
from pipelines.stages import read_models_file, resolve_models
from shards.shardset import iter_shardset, read_shard, shard_name, write_index, write_shard


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A clean set and a 'noisy' set (the same images with noise) of 30 random images, 3 shards each."""
    root = tmp_path_factory.mktemp("sets")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 32, 32, 3), dtype=torch.uint8, generator=g)
    noisy = (images.int() + torch.randint(-40, 41, images.shape, generator=g)).clamp(0, 255).byte()
    labels = torch.randint(0, 10, (30,), generator=g)
    for name, imgs in (("clean", images), ("noisy", noisy)):
        for s in range(3):
            write_shard(root / name / shard_name(name, s), [
                {"key": f"img{i:03d}", "image": imgs[i].numpy(), "cls": int(labels[i]), "json": {}}
                for i in range(10 * s, 10 * s + 10)])
        write_index(root / name, name)
    return {"clean": str(root / "clean"), "noisy": str(root / "noisy")}


def _spec(tmp, name, seed):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(name=name, arch="resnet10t", num_classes=10, kwargs={"channels": (8, 16, 32, 64)}))
    model.model.fc.bias.data.normal_(0, 0.5)  # no exactly tied logits (a zero bias ties them on dead features)
    path = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, path)
    return ModelSpec(name=name, arch="resnet10t", num_classes=10, weights=str(path), kwargs={"channels": [8, 16, 32, 64]})


def test_top1_top5_match_a_plain_loop(sets, tmp_path):
    spec = _spec(tmp_path, "m", 0)
    model = build_model(spec).double()  # float64: batching cannot flip near-tied logits of a random model
    result = evaluate_shardset(model, sets["noisy"], batch_size=7)
    hit1 = hit5 = 0
    samples = list(iter_shardset(sets["noisy"]))
    for s in samples:  # one image at a time, no batching, no webdataset loader
        x = torch.from_numpy(s["image"].copy()).permute(2, 0, 1)[None].double() / 255
        logits = model(x)[0]
        hit1 += int(logits.argmax() == s["cls"])
        hit5 += int(s["cls"] in logits.topk(5).indices.tolist())
    assert result["n"] == 30
    assert result["top1"] == pytest.approx(100 * hit1 / 30, abs=1e-3)
    assert result["top5"] == pytest.approx(100 * hit5 / 30, abs=1e-3)
    assert [p["key"] for p in result["predictions"]] == sorted(s["key"] for s in samples)


def test_cache_skips_evaluated_models_and_recomputes_on_change(sets, tmp_path, prefect_server):
    a, b = _spec(tmp_path, "a", 0), _spec(tmp_path, "b", 1)
    out = tmp_path / "eval"
    kw = {"sets": sets, "out": str(out), "batch_size": 16, "metrics_path": str(tmp_path / "m.json")}

    def cached(result):
        return {r["name"]: {s: v["cached"] for s, v in r["results"].items()} for r in result["records"]}

    first = evaluate_flow(models=[a], **kw)
    assert cached(first) == {"a": {"clean": False, "noisy": False}}
    second = evaluate_flow(models=[a, b], **kw)  # adding a model evaluates only that model
    assert cached(second) == {"a": {"clean": True, "noisy": True}, "b": {"clean": False, "noisy": False}}
    assert second["top1_err"]["a"] == first["top1_err"]["a"]
    save_file({k: v.contiguous() for k, v in build_model(_spec(tmp_path / "..", "a2", 5)).model.state_dict().items()},
              a.weights)  # new weights under the same name
    changed = tmp_path / "noisy2"
    shutil.copytree(sets["noisy"], changed)
    first_shard = sorted(changed.glob("*.tar"))[0]
    samples = list(read_shard(first_shard))
    samples[0]["image"] = 255 - samples[0]["image"]
    write_shard(first_shard, samples)
    write_index(changed, "noisy")
    third = evaluate_flow(models=[a, b], **{**kw, "sets": {"clean": sets["clean"], "noisy": str(changed)}})
    assert cached(third) == {"a": {"clean": False, "noisy": False}, "b": {"clean": True, "noisy": False}}
    csv_rows = (out / "results" / "results-noisy.csv").read_text().splitlines()
    assert csv_rows[0] == ("model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation,"
                           "top1_diff,top5_diff,rank_diff,architecture")  # timm's order, then ours
    assert (out / "results" / "results-clean.csv").read_text().splitlines()[0] == (
        "model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation,architecture")
    assert sorted(r.split(",")[0] for r in csv_rows[1:]) == ["a", "b"]  # the zoo names: one row each
    assert {r.split(",")[-1] for r in csv_rows[1:]} == {"resnet10t"}
    assert json.loads((out / "models" / "b.json").read_text())["accuracy"]["clean"]["n"] == 30


def test_a_failed_model_fails_the_run_and_leaves_the_previous_results(sets, tmp_path, prefect_server):
    good = _spec(tmp_path, "good", 0)
    kw = dict(sets={"clean": sets["clean"]}, out=str(tmp_path / "e"), batch_size=16, metrics_path=str(tmp_path / "m.json"))
    evaluate_flow(models=[good], **kw)
    before = {p: p.read_bytes() for p in [tmp_path / "m.json", *sorted((tmp_path / "e").rglob("*")), *sorted(
              (tmp_path / "tables").rglob("*"))] if p.is_file() and "cache" not in p.parts}
    models = resolve_models(["not_in_zoo", good], {})
    state = evaluate_flow(models=models + [good.replace(name="good_again")], **kw, return_state=True)
    assert state.is_failed() and "1 model(s) failed" in state.message  # a failed model fails the flow run
    assert "unknown model 'not_in_zoo'" in state.message and "nothing written" in state.message
    after = {p: p.read_bytes() for p in before}
    assert after == before and not (tmp_path / "e" / "models" / "good_again.json").exists()
    # what the model that worked computed waits in the cache
    assert list((tmp_path / "e" / "cache" / "good_again").glob("clean-*.json"))


def test_an_unreadable_set_is_named(sets, tmp_path):
    good = _spec(tmp_path, "good", 0)
    broken = tmp_path / "broken"
    shutil.copytree(sets["noisy"], broken)
    sorted(broken.glob("*.tar"))[1].write_bytes(b"garbage")
    with pytest.raises(Exception, match="broken"):
        evaluate_shardset(build_model(good), broken)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(trained_zoo, small_world, prefect_server, tmp_path):
    """The demo pipeline end to end on a tiny set, then the HTML report screenshotted by a real browser."""
    from evaluators.report import ReportInput, build_report
    from pipelines.config import Budget, Select
    from pipelines.flows.generate import generate
    from pipelines.flows.prepare import prepare_flow

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed and could not be installed here (make test installs it via apt)")
    specs = {s.name: s for s in read_models_file(trained_zoo["out"] / "models.json")}
    # label sets (file name -> acceptable classes): the label and its neighbour class; class 0's are empty
    files = sorted(p for p in (small_world / "val").glob("*/*"))
    folders = sorted(p.name for p in (small_world / "val").iterdir())
    label_sets = {f.name: [folders.index(f.parent.name), (folders.index(f.parent.name) + 1) % 10] for f in files}
    label_sets.update({f.name: [] for f in files if f.parent.name == folders[0]})
    (tmp_path / "real.json").write_text(json.dumps(label_sets))
    source = Source(kind="class_folder", data=os.path.commonpath([small_world, tmp_path]), root=str(small_world / "val"),
                    num_classes=10, size=32, crop_pct=1.0, select=Select(mode="per_class", n=1), shard_size=5,
                    out=str(tmp_path / "shards" / "clean"), label_sets=str(tmp_path / "real.json"))
    prepare_flow(source, metrics_path=str(tmp_path / "p.json"))
    budget = {"eta": 7.0, "eps": 25.5, "alpha": 2.0, "max_steps": 8}
    attacks = {"aoa": {"si": 2}, "aoa-si1": {"attack": "aoa", "si": 1}, "pgd": {}}  # two settings of one method
    for attack, options in attacks.items():
        generate(attack, Budget(**budget), {k: v for k, v in options.items() if k != "attack"}, specs["vgg_demo"],
                 source.out, str(tmp_path / "shards" / attack), batch_size=10, devices=["cpu"],
                 method=options.get("attack"))
    sets = {n: str(tmp_path / "shards" / n) for n in ("clean", *attacks)}
    evaluate_flow(models=list(specs.values()), sets=sets, out=str(tmp_path / "eval"), batch_size=16,
                  metrics_path=str(tmp_path / "e.json"))
    for stage in ("ood", "optim"):  # a page of this run and one of another run
        (tmp_path / "report" / "downstream" / stage).mkdir(parents=True)
        (tmp_path / "report" / "downstream" / stage / "index.md").write_text(f"# {stage}\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    def report(out: str, **kw):
        return build_report(ReportInput(
            eval_dir=tmp_path / "eval", shards_root=tmp_path / "shards", clean_dir=Path(sets["clean"]), sets=list(sets),
            surrogate=specs["vgg_demo"], budget=Budget(**budget), out_dir=tmp_path / out,
            methods={s: o.get("attack", s) for s, o in attacks.items()},
            options={s: {k: v for k, v in o.items() if k != "attack"} for s, o in attacks.items()}, **kw))

    result = report("report", downstream=["ood"])
    assert set(result["errors"]) == {"vgg_demo", "resnet10t"}
    # the variant is its own shard set, made by the method it names, and its own row against each baseline
    variant = list(iter_shardset(tmp_path / "shards" / "aoa-si1"))
    assert len(variant) == 10 and {s["json"]["attack"] for s in variant} == {"aoa"}
    assert {s["json"]["config_hash"] for s in variant}.isdisjoint(s["json"]["config_hash"] for s in iter_shardset(sets["aoa"]))
    assert [(t["aoa"], t["baseline"]) for t in result["transfer"]] == [("aoa", "pgd"), ("aoa-si1", "pgd")]
    page = tmp_path / "report" / "report.html"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3 and "<table>" in text
    # the opening sentence and threat model reach the HTML; names, not only indices
    for expected in ("Surrogate <code>vgg_demo</code>", "η = 7.0", "ε = 25.5", "α = 2.0", "at most 8 steps",
                     "si 2", '<td style="text-align: right;">10</td>', "cannot be compared",
                     # text columns left-aligned, numbers right-aligned
                     '<td style="text-align: left;">aoa-si1</td>\n<td style="text-align: left;">aoa</td>\n'
                     '<td style="text-align: left;">vgg_demo</td>\n<td style="text-align: left;">si 1</td>\n'
                     '<td style="text-align: right;">10</td>',
                     # a network registered here is custom; a timm architecture is named as timm names it
                     f"vgg_demo (custom, {json.loads((tmp_path / 'eval/models/vgg_demo.json').read_text())['param_count']:g}"
                     " M params; surrogate)", "resnet10t (timm <code>resnet10t</code>; transfer victim)",
                     # success rates, both conventions, beside the errors
                     "Attack success rates (%)", "<strong>Over all images</strong>",
                     "<strong>Over the images the model classifies correctly clean</strong>"):
        assert expected in text, expected
    # ReaL error against the label sets, recounted from the predictions: images with an empty set are left out
    preds = [json.loads(line) for line in (tmp_path / "eval/predictions/resnet10t/clean.jsonl").read_text().splitlines()]
    scored = [p for p in preds if p.get("label_set")]
    assert len(scored) == 9 and all("label_set" in p for p in preds)  # the image with [] is left out
    real_err = 100 * sum(p["top5"][0] not in p["label_set"] for p in scored) / len(scored)
    real_row = result["markdown"].split("ReaL top-1 error")[1].split("resnet10t (timm")[1].splitlines()[0]
    assert real_row.split("|")[1].strip().startswith(f"{real_err:.1f} (")
    with open(tmp_path / "eval/results/results-clean-real.csv") as f:  # timm's results-imagenet-real.csv
        row = {r["model"]: r for r in csv.DictReader(f)}["resnet10t"]
    real_top5_err = 100 * sum(not set(p["top5"]) & set(p["label_set"]) for p in scored) / len(scored)
    assert float(row["top1_err"]) == pytest.approx(real_err, abs=1e-3)
    assert float(row["top5_err"]) == pytest.approx(real_top5_err, abs=1e-3)
    with open(tmp_path / "eval/results/results-clean.csv") as f:
        plain = {r["model"]: r for r in csv.DictReader(f)}["resnet10t"]
    assert float(row["top1_diff"]) == pytest.approx(float(row["top1"]) - float(plain["top1"]), abs=1e-3)
    assert 'href="pages/ood.html"' in text and "pages/optim.html" not in text  # only this run's pages
    # a set this small gets a table per image (victims fooled per set, recounted here) and the note on what it shows
    fooled = sum(json.loads(line)["top5"][0] != json.loads(line)["label"]
                 for line in (tmp_path / "eval" / "predictions" / "resnet10t" / "aoa.jsonl").read_text().splitlines())
    table = result["markdown"].split("Per image: victims fooled out of 1 (resnet10t)")[1].split("With 10 images")[0]
    assert sum(int(row.split("|")[4]) for row in table.strip().splitlines()[2:]) == fooled  # aoa column
    # success over the images resnet10t got right clean, recounted from the predictions, in the report's table
    def top1_right(s):
        return {p["key"]: p["top5"][0] == p["label"] for p in map(json.loads, (
            tmp_path / "eval" / "predictions" / "resnet10t" / f"{s}.jsonl").read_text().splitlines())}
    right, after = top1_right("clean"), top1_right("aoa")
    rate = 100 * sum(not after[k] for k in right if right[k]) / sum(right.values())
    correct_table = result["markdown"].split("correctly clean**")[1].split("On the surrogate")[0]
    victim_row = next(r for r in correct_table.splitlines() if r.startswith("| resnet10t"))
    assert victim_row.split("|")[2].strip().startswith(f"{rate:.1f} (")  # the aoa column
    assert "18.7–81.3% (exact 95% interval)" in text  # 5 of 10 wrong
    # the transfer verdict is the exact paired test on the same images, recounted here from the predictions
    def wrong(s):
        return {p["key"]: p["top5"][0] != p["label"] for p in map(json.loads, (
            tmp_path / "eval" / "predictions" / "resnet10t" / f"{s}.jsonl").read_text().splitlines())}
    aoa, pgd = wrong("aoa"), wrong("pgd")
    only_aoa, only_pgd = sum(aoa[k] and not pgd[k] for k in aoa), sum(pgd[k] and not aoa[k] for k in aoa)
    n = only_aoa + only_pgd
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_aoa, only_pgd) + 1)) / 2**n) if n else 1.0
    compared = result["transfer"][0]["per_victim"]["resnet10t"]
    assert compared.p == pytest.approx(p) and f"{only_aoa} vs {only_pgd} of 10 images" in text
    assert result["transfer"][0]["overall"].p == pytest.approx(p)  # one victim: the sign test is McNemar's
    card = json.loads((tmp_path / "report" / "robustbench" / "resnet10t.json").read_text())
    record = json.loads((tmp_path / "eval" / "models" / "resnet10t.json").read_text())["accuracy"]
    assert card["clean_acc"] == f"{record['clean']['top1']:.2f}"
    assert card["transfer_acc"]["aoa"] == f"{record['aoa']['top1']:.2f}"
    worst = min(v["top1"] for name, v in record.items() if name != "clean")  # worst attack set (aoa-si1 included)
    assert card["worst_transfer_acc"] == f"{worst:.2f}"
    # RobustBench's own fields where they mean the same; its eps and autoattack_acc (white-box AutoAttack) not used
    assert {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
            "clean_acc", "reported", "footnote"} <= set(card) and not {"eps", "autoattack_acc"} & set(card)
    assert card["link"] is None and card["architecture"] == "resnet10t"  # no pretrained tag: no Hub page to link
    assert (card["transfer_rmsd"], card["transfer_linf"], card["threat_model"]) == (7.0, 25.5, "transfer")
    # the surrogate x victim matrix: the white-box cell marked, each baseline compared only with AoA sets made on
    # its surrogate (aoa-si1 declared made on resnet10t: a second surrogate, with no baseline of its own)
    def matrix(markdown):  # {(attack set, model): cell}
        lines = [line for line in markdown.split("attack set × model")[1].split("\n## ")[0].splitlines()
                 if line.startswith("| ")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        return {(cells[0], model): cell for line in lines[1:]
                for cells in [[c.strip() for c in line.strip("|").split("|")]]
                for model, cell in zip(header[2:], cells[2:])}

    cells = matrix(result["markdown"])
    assert cells[("aoa", "vgg_demo")].endswith("**wb**") and "**wb**" not in cells[("aoa", "resnet10t")]
    two = report("report2", downstream=[], set_surrogates={"aoa-si1": specs["resnet10t"]})
    assert [(t["surrogate"], t["aoa"], t["baseline"]) for t in two["transfer"]] == [("vgg_demo", "aoa", "pgd")]
    cells = matrix(two["markdown"])
    assert cells[("aoa-si1", "resnet10t")].endswith("**wb**") and "**wb**" not in cells[("aoa-si1", "vgg_demo")]
    assert "and for the sets that name theirs: `resnet10t`" in two["markdown"]
    ood_page = (tmp_path / "report" / "pages" / "ood.html").read_text()
    assert "<table>" in ood_page and '<a href="../report.html">← Robustness report</a>' in ood_page  # the way back
    assert (tmp_path / "report" / "pages" / "../report.html").resolve() == page.resolve()
    assert "[OOD" in (tmp_path / "report" / "pages" / "README.md").read_text()
    # a profile without downstream stages: no page stays, and the folder is not empty (DVC warns on an empty output)
    report("report", downstream=[])
    assert [f.name for f in (tmp_path / "report" / "pages").iterdir()] == ["README.md"]
    assert "no downstream stages" in (tmp_path / "report" / "pages" / "README.md").read_text()
    assert not (tmp_path / "report" / "downstream" / "ood" / "index.html").exists()  # another stage's output folder is left alone
    assert "data:image/png;base64," in result["markdown_inline"] and "](figures/" not in result["markdown_inline"]
    shot = tmp_path / "screenshot.png"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == 3
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,2400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page with figures, not a blank canvas
    _assert_images_loaded(chromium, page, tmp_path)


def _assert_images_loaded(chromium, page, tmp_path):
    """Every <img> decoded: a tiny script page reports naturalWidth of each image of the report."""
    probe = tmp_path / "probe.html"
    probe.write_text(
        f"<iframe id=f src='{page.as_uri()}'></iframe><script>"
        "f.onload=()=>{const imgs=[...f.contentDocument.images];"
        "document.title=imgs.map(i=>i.complete&&i.naturalWidth>0).join(',')}</script>")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile2'}",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<title>true,true,true</title>" in dom


def test_results_csv_rank_diff_is_signed_and_crop_columns_describe_the_shards(sets, tmp_path, prefect_server):
    import csv

    models = [_spec(tmp_path, f"m{i}", i) for i in range(4)]
    evaluate_flow(models=models, sets=sets, out=str(tmp_path / "e"), batch_size=16,
                  metrics_path=str(tmp_path / "m.json"),
                  source=Source(kind="class_folder", data="d", root="d", size=24, crop_pct=0.875, shard_size=10, out="o"))
    rows = {s: list(csv.DictReader(open(tmp_path / "e" / "results" / f"results-{s}.csv"))) for s in sets}
    clean_rank = {r["model"]: i for i, r in enumerate(rows["clean"])}
    for i, r in enumerate(rows["noisy"]):
        expected = clean_rank[r["model"]] - i
        assert r["rank_diff"] == (f"{expected:+d}" if expected else "0")
        model_size = build_model(models[0]).data_config["input_size"][-1]  # what the model saw: 24 px resized
        assert (r["img_size"], r["crop_pct"], r["interpolation"]) == (str(model_size), "0.875", "bicubic+bicubic")


def test_published_table_is_joined_on_architecture_and_pretrained_tag():
    """Before: joined on the architecture alone, the adversarially trained InceptionV3 sat on the plain InceptionV3
    row, the adversarial rows stayed empty, and two models of one architecture collided (the last won)."""
    from evaluators.published import published_join

    errors = {"vgg16_tv": {"clean": 30.0, "aoa": 91.5}, "vgg16_again": {"clean": 30.0, "aoa": 91.5},
              "inc_adv": {"clean": 23.0, "aoa": 60.0}, "inc_ens": {"clean": 20.0, "aoa": 50.0},
              "inc_tv": {"clean": 22.9, "aoa": 80.0}, "mine": {"clean": 1.0, "aoa": 2.0}}
    models = {"vgg16_tv": "vgg16.tv_in1k", "vgg16_again": "vgg16.tv_in1k", "inc_adv": "inception_v3.tf_adv_in1k",
              "inc_ens": "inception_resnet_v2.tf_ens_adv_in1k", "inc_tv": "inception_v3.tv_in1k", "mine": None}
    rows, apart = published_join(errors, models)
    by_victim = {r[0]: r for r in rows}
    assert by_victim["VGG16"] == ["VGG16", "38.51", "99.85", "vgg16_tv (`vgg16.tv_in1k`)", 30.0, 91.5]
    assert by_victim["InceptionV3adv"][3:] == ["inc_adv (`inception_v3.tf_adv_in1k`)", 23.0, 60.0]
    assert by_victim["InceptionResNetV2advens"][3] == "inc_ens (`inception_resnet_v2.tf_ens_adv_in1k`)"
    assert by_victim["InceptionV3"][3:] == ["-", "-", "-"]  # torchvision's InceptionV3 is not the published one
    assert by_victim["ResNet50"][3:] == ["-", "-", "-"]  # not evaluated here
    assert len(rows) == 19 and sum(r[3] != "-" for r in rows) == 3  # one model per row at most
    assert apart == ["vgg16_again", "inc_tv", "mine"]
    import timm

    from evaluators.published import _published

    named = [r["timm_model"] for r in _published() if r["timm_model"]]
    assert len(named) == 12 and set(named) <= set(timm.list_pretrained())  # timm 1.0 names, each a real model


def test_more_loader_workers_than_shards_read_every_sample_once(sets, tmp_path):
    """webdataset gives each worker whole shards: a worker without one used to end the loader with "No samples
    found"; the loader now starts at most one worker per shard."""
    from evaluators.classification import shard_loader

    keys = [k for _, _, batch, _ in shard_loader(sets["clean"], batch_size=7, workers=8) for k in batch]
    assert sorted(keys) == sorted(s["key"] for s in iter_shardset(sets["clean"])) and len(keys) == 30


def test_a_truncated_cache_entry_is_recomputed_and_a_dropped_model_leaves_the_results(sets, tmp_path, prefect_server,
                                                                                       caplog):
    a, b = _spec(tmp_path, "a", 0), _spec(tmp_path, "b", 1)
    out = tmp_path / "eval"
    kw = {"sets": sets, "out": str(out), "batch_size": 16, "metrics_path": str(tmp_path / "m.json")}
    first = evaluate_flow(models=[a, b], **kw)
    entry = sorted((out / "cache" / "a").glob("clean-*.json"))[0]
    entry.write_text(entry.read_text()[:100])  # what a kill inside a plain write leaves
    again = evaluate_flow(models=[a], **kw)  # b is no longer evaluated
    records = {r["name"]: r for r in again["records"]}
    assert not records["a"]["results"]["clean"]["cached"] and records["a"]["results"]["noisy"]["cached"]
    assert again["top1_err"]["a"] == first["top1_err"]["a"] and "unreadable cache entry" in caplog.text
    assert json.loads(entry.read_text())["n"] == 30  # rewritten whole
    assert sorted(p.name for p in (out / "models").iterdir()) == ["a.json"]
    assert not (out / "predictions" / "b").exists()
    assert [r.split(",")[0] for r in (out / "results" / "results-clean.csv").read_text().splitlines()[1:]] == ["a"]


def test_compare_counts_what_differs_against_a_plain_computation(sets, tmp_path):
    """A copy of a set with two images changed (one by a single quantisation step at one pixel, one by noise):
    the differing images, |delta| and RMSD over every pixel, and each victim's changed predictions, recomputed here
    image by image."""
    import numpy as np

    from evaluators.compare import NotComparable, compare_shardsets

    copy = tmp_path / "copy"
    shutil.copytree(sets["noisy"], copy)
    shard = sorted(copy.glob("*.tar"))[1]
    samples = list(read_shard(shard))
    samples[0]["image"] = samples[0]["image"].copy()
    samples[0]["image"][3, 4, 1] ^= 1  # one quantisation step
    g = np.random.default_rng(0)
    samples[5]["image"] = g.integers(0, 256, samples[5]["image"].shape, dtype=np.uint8)
    write_shard(shard, samples)
    write_index(copy, "noisy")
    spec = _spec(tmp_path, "victim", 0)
    model = build_model(spec)
    result = compare_shardsets(sets["noisy"], copy, {"victim": model})

    original = {s["key"]: s["image"] for s in iter_shardset(sets["noisy"])}
    changed = {s["key"]: s["image"] for s in iter_shardset(copy)}
    deltas = [np.abs(original[k].astype(int) - changed[k].astype(int)) for k in sorted(original)]
    everything = np.concatenate([d.ravel() for d in deltas])
    assert result["differing_keys"] == [samples[0]["key"], samples[5]["key"]] and result["images"] == 30
    assert result["max_abs"] == everything.max()
    assert result["mean_abs"] == pytest.approx(everything.mean()) and result["rmsd"] == pytest.approx(
        math.sqrt((everything.astype(float) ** 2).mean()))

    def top1(image):
        return int(model(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255).argmax())

    with torch.no_grad():
        expected = sum(top1(original[k]) != top1(changed[k]) for k in result["differing_keys"])
    assert result["changed_predictions"] == {"victim": expected}
    # the victims see the differing images in batches: one at a time gives the same count
    assert compare_shardsets(sets["noisy"], copy, {"victim": model}, batch_size=1)["changed_predictions"] == {
        "victim": expected}
    fewer = tmp_path / "fewer"  # a set that lost a shard: not the same images
    shutil.copytree(sets["noisy"], fewer)
    sorted(fewer.glob("*.tar"))[0].unlink()
    write_index(fewer, "noisy")
    with pytest.raises(NotComparable, match="key"):
        compare_shardsets(sets["noisy"], fewer)


def test_a_shard_not_listed_in_sha256sums_is_not_read_and_the_stage_refuses_the_set(sets, tmp_path):
    """An extra shard beside a set (pgd-000006.tar) was read: n = 350 for a 300-image set, cached under the key of
    the 300. The loader reads the listed shards only, and evaluate's input check refuses the set, naming the file."""
    from pipelines.config import ConfigError
    from pipelines.params import load_params
    from pipelines.stages import require_inputs

    grown = tmp_path / "grown"
    shutil.copytree(sets["noisy"], grown)
    shutil.copy(sorted(grown.glob("*.tar"))[0], grown / shard_name("noisy", 6))
    model = build_model(_spec(tmp_path, "m", 0))
    assert evaluate_shardset(model, grown)["n"] == 30  # the 30 images SHA256SUMS lists, not 40
    with pytest.raises(ConfigError, match=r"noisy-000006.tar: not listed in SHA256SUMS"):
        require_inputs(load_params("params.yaml"), {"noisy": str(grown)}, [])


def test_the_loader_refuses_a_member_over_its_bound_before_reading_it(sets):
    """A shard whose header declares a 6 GiB member made evaluate's loader (webdataset reads members whole) die of
    MemoryError while verify refused it; the loader now checks every header against the same bound first. Here
    the bound is set below a real PNG member's size, so the check is seen to act without a 6 GiB file."""
    from evaluators.classification import shard_loader
    from shards.shardset import MAX_MEMBER_BYTES

    assert list(shard_loader(sets["clean"], 8, max_member=MAX_MEMBER_BYTES))  # the real bound reads the set
    with pytest.raises(ValueError, match=r"clean-000000.tar: member 'img000.png' declares \d+ bytes, more than"):
        shard_loader(sets["clean"], 8, max_member=100)


def test_success_rates_count_both_denominators_with_exact_intervals():
    """Against a hand count and the Clopper-Pearson interval from beta quantiles (not scipy's binomtest)."""
    from scipy.stats import beta

    from evaluators.success import success_rates

    def preds(wrong: set[int]) -> list[dict]:
        return [{"key": f"k{i}", "label": 3, "top5": [4 if i in wrong else 3, 0, 1, 2, 5]} for i in range(20)]

    clean = preds({0, 1, 2, 3, 4})  # 15 right clean
    attacked = preds({0, 1, 5, 6, 7, 8, 9, 10}) + [{"key": "extra", "label": 1, "top5": [2]}]  # no clean twin
    rates = success_rates(clean, attacked)

    def clopper_pearson(k, n):
        return [100 * (beta.ppf(0.025, k, n - k + 1) if k else 0.0), 100 * (beta.ppf(0.975, k + 1, n - k) if k < n else 1.0)]

    assert (rates["asr_all"], rates["asr_all_n"]) == (40.0, 20)  # 8 of the 20 shared images
    assert (rates["asr_correct"], rates["asr_correct_n"]) == (40.0, 15)  # 6 of the 15 right clean: 5..10
    assert rates["asr_all_ci"] == pytest.approx(clopper_pearson(8, 20), abs=0.01)
    assert rates["asr_correct_ci"] == pytest.approx(clopper_pearson(6, 15), abs=0.01)
    none_right = success_rates(preds(set(range(20))), attacked)
    assert none_right["asr_correct"] is None and none_right["asr_correct_n"] == 0
