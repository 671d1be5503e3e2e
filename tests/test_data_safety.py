"""Inputs that used to destroy or corrupt data: each case here failed before its fix. Nothing the project did not
write is deleted, an empty or failed result never replaces a good one, and bad input is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipelines.config import ConfigError, Source
from pipelines.flows.prepare import prepare_flow
from sources import BadSourceError


def _tree(root, classes=3, per_class=2):
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), (20 * c, 10 * i, 100)).save(root / f"class{c:02d}" / f"img{i}.png")
    return root


def _source_params(root, out, **kw):
    """The source section as params.yaml writes it."""
    return {"kind": "class_folder", "data": str(root), "root": str(root), "num_classes": 10, "size": 32, "crop_pct": 1.0,
            "filter": "bicubic", "select": {"mode": "all", "n": 0, "seed": 0}, "shard_size": 4, "out": str(out), **kw}


def _source(root, out, **kw):
    return Source.model_validate(_source_params(root, out, **kw))


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["holder", "root", "inside"])
def test_an_output_overlapping_the_source_is_refused_before_anything_is_touched(tmp_path, where, prefect_server):
    root = _tree(tmp_path / "src" / "val")
    (tmp_path / "src" / "notes.txt").write_text("mine")
    out = {"holder": tmp_path / "src", "root": root, "inside": root / "class00" / "clean"}[where]
    before = _files(tmp_path / "src")
    with pytest.raises(ConfigError, match="source.out .* source.root"):
        prepare_flow(_source(root, out), metrics_path=str(tmp_path / "m.json"))
    assert _files(tmp_path / "src") == before


def test_a_folder_with_files_prepare_did_not_write_is_not_replaced(tmp_path, prefect_server):
    root, out = _tree(tmp_path / "val"), tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"holds files the prepare stage did not write \(thesis.tex\)"):
        prepare_flow(_source(root, out), metrics_path=str(tmp_path / "m.json"))
    assert (out / "thesis.tex").read_text() == "years of work"


def test_an_empty_result_never_replaces_a_good_set(tmp_path, prefect_server):
    root, out = _tree(tmp_path / "val"), tmp_path / "clean"
    prepare_flow(_source(root, out), metrics_path=str(tmp_path / "m.json"))
    good = _files(out)
    with pytest.raises(ConfigError, match="nothing selected from 6 indexed image"):
        prepare_flow(_source(root, out, select={"mode": "first", "n": 0, "seed": 0}),
                     metrics_path=str(tmp_path / "m.json"))
    assert _files(out) == good
    bad = tmp_path / "bad"
    for c in range(2):
        (bad / f"c{c}").mkdir(parents=True)
        (bad / f"c{c}" / "x.jpg").write_text("not an image")
    with pytest.raises(BadSourceError, match=r"all 2 selected image\(s\) were rejected"):
        prepare_flow(_source(bad, out), metrics_path=str(tmp_path / "m.json"))
    assert _files(out) == good
    assert len((tmp_path / "clean.rejects.tsv").read_text().splitlines()) == 2  # the reasons stay readable


def test_more_class_folders_than_classes_is_refused(tmp_path, prefect_server):
    root = _tree(tmp_path / "val", classes=12, per_class=1)
    with pytest.raises(ConfigError, match="has label 11 \\(of 12 classes\\) but source.num_classes is 10"):
        prepare_flow(_source(root, tmp_path / "clean"), metrics_path=str(tmp_path / "m.json"))
    assert not (tmp_path / "clean").exists()


def test_a_killed_runs_build_folder_is_removed_by_the_next_run(tmp_path, prefect_server):
    root, out = _tree(tmp_path / "val"), tmp_path / "clean"
    stale = tmp_path / ".clean.building-k1ll3d"
    stale.mkdir()
    (stale / "clean-000000.tar").write_bytes(b"half")
    prepare_flow(_source(root, out), metrics_path=str(tmp_path / "m.json"))
    assert not stale.exists() and (out / "SHA256SUMS").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".clean")) == [".clean.lock"]


def test_a_prefect_api_that_does_not_answer_is_named_in_one_line(tmp_path):
    """Before: Prefect's client retried 5 times with backoff (6 minutes on a dead server), then a traceback."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"source": _source_params(_tree(tmp_path / "val"), tmp_path / "clean")}))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_CLIENT_MAX_RETRIES"}
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", "--params", str(params)],
                         env={**env, "PREFECT_API_URL": url}, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert f"the Prefect API at {url} stopped answering" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "clean").exists()


def test_a_name_listed_twice_in_the_label_file_is_one_line_naming_both_lines(tmp_path):
    from sources.reading import Rejects, label_file_source

    (tmp_path / "flat").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20)).save(tmp_path / "flat" / name)
    (tmp_path / "val.txt").write_text("a.png 1\nb.png 2\na.png 1\n")
    with pytest.raises(BadSourceError, match=r"val.txt: lines 1 and 3 both name 'a.png': keep one line"):
        label_file_source(tmp_path / "flat", tmp_path / "val.txt", Rejects(), num_classes=10)
    (tmp_path / "val.txt").write_text("a.png 1\nb.png 2\na.png 7\n")
    with pytest.raises(BadSourceError, match=r"lines 1 and 3 both name 'a.png' \(labels 1 and 7\)"):
        label_file_source(tmp_path / "flat", tmp_path / "val.txt", Rejects(), num_classes=10)


def test_links_out_of_the_root_are_refused_with_a_reason(tmp_path):
    from sources.reading import Rejects, class_folder_source, label_file_source

    outside = tmp_path / "private"
    outside.mkdir()
    Image.new("RGB", (20, 20)).save(outside / "secret.png")
    root = _tree(tmp_path / "val", classes=2, per_class=1)
    (root / "class00" / "leak.png").symlink_to(outside / "secret.png")
    (root / "parent").symlink_to(tmp_path, target_is_directory=True)
    rejects = Rejects()
    samples, _ = class_folder_source(root, rejects)
    assert sorted(s.path.name for s in samples) == ["img0.png", "img0.png"]
    reasons = dict(rejects.items)
    assert "outside the source root: refused" in reasons[str(root / "class00" / "leak.png")]
    assert "outside the source root: refused" in reasons[str(root / "parent")]

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (20, 20)).save(flat / "ok.png")
    (flat / "leak.png").symlink_to(outside / "secret.png")
    (tmp_path / "val.txt").write_text("ok.png 1\nleak.png 2\n")
    rejects = Rejects()
    assert [s.path.name for s in label_file_source(flat, tmp_path / "val.txt", rejects, 10)] == ["ok.png"]
    assert "outside" in dict(rejects.items)[str(flat / "leak.png")]


def test_every_skipped_file_is_in_the_rejects_with_its_reason(tmp_path):
    from sources.reading import Rejects, class_folder_source, label_file_source

    root = _tree(tmp_path / "val", classes=2, per_class=1)
    Image.new("RGB", (20, 20)).save(root / "class00" / "anim.gif")
    (root / "class00" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "class01" / ".DS_Store").write_bytes(b"x")
    (root / "class01" / "nested").mkdir()
    (root / "LICENSE").write_text("cc-by")
    rejects = Rejects()
    samples, _ = class_folder_source(root, rejects)
    assert len(samples) == 2
    reasons = {k.removeprefix(str(root) + "/"): v for k, v in rejects.items}
    assert set(reasons) == {"class00/anim.gif", "class00/photo.heic", "class01/.DS_Store", "class01/nested",
                            "LICENSE"}
    assert "'.gif' is not read" in reasons["class00/anim.gif"] and "'.heic'" in reasons["class00/photo.heic"]

    (tmp_path / "val.txt").write_text("img0.png 0\n")
    rejects = Rejects()
    label_file_source(root / "class00", tmp_path / "val.txt", rejects, 10)
    assert {p.rsplit("/", 1)[-1] for p, r in rejects.items if "not listed in" in r} == {"anim.gif", "photo.heic"}


def test_a_float_tiff_is_scaled_by_its_range_or_refused(tmp_path):
    import numpy as np

    from sources.reading import load_crop

    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    crop = load_crop(tmp_path / "unit.tif", 32, crop_pct=1.0)
    assert crop.shape == (32, 32, 3) and crop[0, 0, 0] == 0 and crop[0, -1, 0] == 255  # not an all-black crop
    assert np.array_equal(crop[..., 0], np.round(ramp * 255).astype(np.uint8))
    Image.fromarray(ramp * 255, "F").save(tmp_path / "bytes.tif")
    assert np.array_equal(load_crop(tmp_path / "bytes.tif", 32, crop_pct=1.0), crop)
    Image.fromarray(ramp * 1000, "F").save(tmp_path / "hdr.tif")
    with pytest.raises(BadSourceError, match="float image with values 0..1000: neither 0..1 nor 0..255"):
        load_crop(tmp_path / "hdr.tif", 32, crop_pct=1.0)


def test_a_key_given_twice_in_params_is_refused_naming_it_and_its_lines(tmp_path):
    from pipelines.params import load_params

    p = tmp_path / "params.yaml"
    p.write_text("budget:\n  eta: 7.0\n  eps: 25.5\n  alpha: 2.0\n  eta: 3.0\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"params.yaml: key 'eta' is given twice in one mapping \(lines 2 and 5\)"):
        load_params(p)


@pytest.mark.parametrize("change,problem", [({"eps": float("inf")}, "budget.eps: Input should be a finite number"),
                                            ({"eta": float("inf")}, "budget.eta: Input should be a finite number"),
                                            ({"eps": 300.0}, "budget.eps: Input should be less than or equal to 255"),
                                            ({"alpha": 100.0}, "alpha (100.0) is larger than eps (25.5)")])
def test_a_budget_off_the_pixel_scale_is_refused(tmp_path, change, problem):
    from pipelines.params import load_params

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"budget": {"eta": 7.0, "eps": 25.5, "alpha": 2.0, "max_steps": 5, **change}}))
    with pytest.raises(ConfigError) as e:
        load_params(p)
    assert problem in str(e.value)


@pytest.fixture
def small_set(tmp_path):
    import numpy as np

    from shards.card import card_data, write_card
    from shards.shardset import shard_name, shard_records, write_index, write_shard

    root = tmp_path / "set"
    for s in range(2):
        write_shard(root / shard_name("aoa", s), [{"key": f"k{s}{i}", "image": np.full((8, 8, 3), i, np.uint8),
                                                   "cls": i, "json": {"key": f"k{s}{i}", "label": i, "wnid": f"c{i}"}}
                                                  for i in range(3)])
    records = [meta for p in sorted(root.glob("*.tar")) for _, _, meta in shard_records(p)]
    write_card(root, card_data(root, records, {"id": "mit"}, ["original"], "a small set", {"source": {
        "kind": "class_folder", "root": "images", "size": 8, "crop_pct": 1.0, "filter": "bicubic", "images": 6,
        "rejects": 0, "label_sets": None, "with_label_set": 0}}))
    write_index(root, "aoa")
    return root


def _resum(root):
    from common.files import sha256_file

    lines = (root / "SHA256SUMS").read_text().splitlines()
    (root / "SHA256SUMS").write_text("".join(f"{sha256_file(root / line.split('  ')[1])}  {line.split('  ')[1]}\n"
                                             for line in lines))


def test_verify_holds_the_set_to_its_own_file_list(small_set):
    from shards.verify import verify_shardset

    assert verify_shardset(small_set, 10, size=8) == []
    manifest = small_set / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace('"label": 1', '"label": 7'))  # tampered, then re-summed
    _resum(small_set)
    (small_set / "evil.py").write_text("import os")
    sums = (small_set / "SHA256SUMS").read_text().splitlines()
    sums = [s for s in sums if not s.endswith("_info.json")]  # an index file left out of the sums
    sums += [sums[0].split("  ")[0] + "  ../../etc/hostname", sums[0].split("  ")[0] + "  /etc/hostname",
             sums[0]]  # paths outside the set, and a line given twice
    (small_set / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    problems = "\n".join(verify_shardset(small_set, 10, size=8))
    assert "manifest.jsonl: does not match the shards" in problems
    assert "evil.py: not listed in SHA256SUMS" in problems
    assert "_info.json: not listed in SHA256SUMS" in problems
    assert "'../../etc/hostname' is not a file name inside the set" in problems
    assert "'/etc/hostname' is not a file name inside the set" in problems
    assert "aoa-000000.tar is listed again (first on line 1)" in problems
    assert "etc/hostname: listed" not in problems and "etc/hostname: checksum" not in problems  # never read


def test_verify_refuses_a_member_larger_than_an_image_without_reading_it(small_set):
    import tarfile

    from shards.verify import verify_shardset

    shard = small_set / "aoa-000001.tar"
    info = tarfile.TarInfo("k10.png")
    info.size = 6 << 30
    shard.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)  # a header declaring 6 GiB, nothing behind
    problems = verify_shardset(small_set, 10, size=8)
    assert any("member 'k10.png' declares 6442450944 bytes, more than a sample of this set can hold" in p
               for p in problems)


def test_json_records_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Metrics and cache records: a write that dies before its rename leaves the old file and no temporary."""
    import json
    import os

    from common.files import write_json

    record = tmp_path / "eval" / "cache.json"
    write_json(record, {"top1": 50.0}, pretty=False)
    assert json.loads(record.read_text()) == {"top1": 50.0} and "\n" not in record.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(record, {"top1": 99.0})
    assert json.loads(record.read_text()) == {"top1": 50.0}
    assert [p.name for p in record.parent.iterdir()] == ["cache.json"]


def test_a_fifo_and_a_link_loop_are_rejects_with_their_reasons(tmp_path):
    """A FIFO named like an image hung prepare (the reader blocked on it); a link loop crashed it (RuntimeError from
    resolve). Both are now rejects with a reason, and the other images are indexed."""
    import os

    from sources.reading import Rejects, class_folder_source, label_file_source

    root = _tree(tmp_path / "val", classes=2, per_class=1)
    os.mkfifo(root / "class00" / "pipe.JPEG")
    (root / "class01" / "loop.png").symlink_to(root / "class01" / "loop.png")
    rejects = Rejects()
    samples, _ = class_folder_source(root, rejects)
    assert sorted(s.path.name for s in samples) == ["img0.png", "img0.png"]
    reasons = dict(rejects.items)
    assert "not a regular file" in reasons[str(root / "class00" / "pipe.JPEG")]
    assert "link loop" in reasons[str(root / "class01" / "loop.png")]
    (tmp_path / "val.txt").write_text("img0.png 0\npipe.JPEG 1\n")
    rejects = Rejects()
    assert [s.path.name for s in label_file_source(root / "class00", tmp_path / "val.txt", rejects, 10)] == ["img0.png"]
    assert "not a regular file" in dict(rejects.items)[str(root / "class00" / "pipe.JPEG")]


def test_one_file_reached_by_two_paths_is_one_sample_or_refused(tmp_path):
    """A linked class folder (c_alias -> class00) and a link into another class made one image three samples with
    three labels. Now: the same file under one label is indexed once; under two labels it is refused."""
    from sources.reading import Rejects, class_folder_source

    root = _tree(tmp_path / "val", classes=2, per_class=2)
    (root / "class01" / "twin.png").symlink_to(root / "class00" / "img0.png")  # another class: refused
    (root / "class00" / "again.png").symlink_to(root / "class00" / "img1.png")  # the same class: once
    (root / "class02_alias").symlink_to(root / "class01", target_is_directory=True)  # a third label for class01's
    rejects = Rejects()
    samples, classes = class_folder_source(root, rejects)
    files = {(s.path.resolve().relative_to(root), s.label) for s in samples}
    assert classes == ["class00", "class01", "class02_alias"]
    assert files == {(Path("class00/img1.png"), 0)}  # everything else is reached under two labels
    reasons = dict(rejects.items)
    assert "indexed once" in reasons[str(root / "class00" / "again.png")]
    for refused in ("class00/img0.png", "class01/twin.png", "class01/img0.png", "class02_alias/img1.png"):
        assert "under another class" in reasons[str(root / refused)], refused


def test_a_refusal_inside_a_flow_is_one_line_on_the_real_commands_stderr(tmp_path):
    """The stage's own command, as a user runs it: a stray folder among wnid folders, refused inside the prepare
    flow, left a 27-line Prefect traceback on stderr above the one-line message. Now stderr is that line; the run's log (stdout) has no
    traceback either."""
    import subprocess
    import sys

    root = tmp_path / "val"
    (root / "n01440764").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "n01440764" / "a.JPEG", "JPEG")
    (root / "backup").mkdir()
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"source": _source_params(root, tmp_path / "clean", num_classes=1000)}))
    damagenet = Path(sys.executable).with_name("damagenet")
    run = subprocess.run([str(damagenet), "prepare", "--params", str(params)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"damagenet prepare: {root}: 1 WordNet-id class folders mixed with 1 other "
                                       "folder(s) ['backup']: remove or rename them (labels would shift)"]
    assert "Traceback" not in run.stdout and not (tmp_path / "clean").exists()


@pytest.mark.parametrize("edit,problem", [
    (lambda p: p["evaluate"].update(out="data/shards/pgd/eval"),
     "evaluate.out (data/shards/pgd/eval) lies inside the shard set of attacks.pgd (data/shards/pgd)"),
    (lambda p: p["attacks"].update(clean={"attack": "pgd"}),
     "source.out (data/shards/clean) lies inside the shard set of attacks.clean (data/shards/clean)"),
])
def test_an_output_inside_another_stages_output_is_refused_when_the_params_load(tmp_path, edit, problem):
    """evaluate.out inside a shard set was accepted and broke the set (verify: 4 problems); an attack set named
    'clean' was refused only inside the flow, with 62 tracebacks."""
    import subprocess
    import sys

    params = yaml.safe_load(open("params.yaml"))
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    run = subprocess.run([str(Path(sys.executable).with_name("damagenet")), "--params", str(path), "evaluate"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and problem in run.stderr


def test_a_dot_slash_name_in_val_txt_is_its_file_and_nfc_nfd_twins_get_keys_that_differ(tmp_path):
    """'./a.png' in val.txt was indexed and also rejected as not listed; café.png in NFC and NFD made two keys that
    look the same."""
    import unicodedata

    from sources.reading import Rejects, class_folder_source, label_file_source

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (20, 20)).save(flat / "a.png")
    (tmp_path / "val.txt").write_text("./a.png 1\n")
    rejects = Rejects()
    assert [s.path.name for s in label_file_source(flat, tmp_path / "val.txt", rejects, 10)] == ["a.png"]
    assert rejects.items == []

    root = tmp_path / "val"
    (root / "cafes").mkdir(parents=True)
    for form in ("NFC", "NFD"):
        Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "cafes" / unicodedata.normalize(form, "café.png"))
    samples, _ = class_folder_source(root, Rejects())
    looks = {unicodedata.normalize("NFC", s.key) for s in samples}
    assert len(samples) == 2 and len(looks) == 2
