"""Source reading: every bad-input case, strict mode, class-index mapping, and the crop against timm's transform."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sources.reading import (
    BadSourceError,
    Rejects,
    class_folder_source,
    label_file_source,
    load_crop,
    load_images,
)


def _jpeg(path, colour=(200, 30, 30), size=(40, 48), mode="RGB"):
    Image.new(mode, size, colour).save(path, "JPEG", quality=95)
    return path


def _reason(path, **kw) -> str:
    with pytest.raises(BadSourceError) as e:
        load_crop(path, 32, **kw)
    assert str(path) in str(e.value)
    return e.value.reason


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.JPEG"
    p.write_bytes(b"")
    assert "empty file" in _reason(p)


def test_truncated_jpeg(tmp_path):
    good = _jpeg(tmp_path / "good.JPEG", size=(64, 64))
    p = tmp_path / "cut.JPEG"
    p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert "cannot decode" in _reason(p)


def test_text_file_named_jpeg(tmp_path):
    p = tmp_path / "notes.JPEG"
    p.write_text("this is not an image\n")
    assert "not an image" in _reason(p)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = tmp_path / "cmyk.JPEG"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(p, "JPEG", quality=100)  # pure red in CMYK
    img = load_crop(p, 32, crop_pct=1.0)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img[..., 0].mean() > 240 and img[..., 1:].mean() < 15


def test_greyscale_becomes_three_equal_channels(tmp_path):
    p = tmp_path / "grey.png"
    Image.new("L", (40, 40), 77).save(p)
    img = load_crop(p, 32, crop_pct=1.0)
    assert img.shape == (32, 32, 3) and (img == 77).all()


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (40, 40), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    img.paste(1, (0, 0, 20, 40))  # left half: palette index 1, marked transparent
    img.save(p, transparency=1)
    out = load_crop(p, 40, crop_pct=1.0, min_side=8)
    assert (out[:, :18] == 255).all()  # transparent -> white
    assert (out[:, 22:] == [10, 20, 30]).all()  # opaque palette colour kept


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.full((40, 40), 32896, dtype=np.uint16)  # 32896 / 65535 * 255 = 128.0
    arr[:, 20:] = 65535
    Image.fromarray(arr).save(p)
    out = load_crop(p, 40, crop_pct=1.0, min_side=8)
    assert (out[:, :18] == 128).all() and (out[:, 22:] == 255).all()


def test_one_pixel_image(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(p)
    assert "too small (1x1" in _reason(p)


def test_decompression_bomb(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels is 4x this limit
    assert "decompression bomb" in _reason(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # between 1x and 2x: Pillow only warns; we refuse
    assert "decompression bomb" in _reason(p)


def test_unreadable_file(tmp_path):
    dangling = tmp_path / "gone.JPEG"
    dangling.symlink_to(tmp_path / "nowhere.JPEG")
    assert "not found" in _reason(dangling)
    locked = _jpeg(tmp_path / "locked.JPEG")
    os.chmod(locked, 0)
    if os.geteuid() != 0:  # root reads through permission bits; the dangling link above covers that case
        assert "permission denied" in _reason(locked)
    folder = tmp_path / "dir.JPEG"
    folder.mkdir()
    assert "directory" in _reason(folder)


def _tree(tmp_path):
    root = tmp_path / "src"
    for c in ("a_class", "b_class"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _jpeg(root / c / f"{c}_{i}.JPEG", colour=(40 * i, 100, 200))
    (root / "c_empty").mkdir()
    (root / "a_class" / "zz_empty.JPEG").write_bytes(b"")
    (root / "b_class" / "zz_text.JPEG").write_text("hello")
    return root


def test_bad_neighbours_never_drop_good_images(tmp_path):
    rejects = Rejects()
    samples, classes = class_folder_source(_tree(tmp_path), rejects)
    assert classes == ["a_class", "b_class", "c_empty"]
    assert [r[1] for r in rejects.items] == ["empty class folder: no image files"]
    images, labels, kept = load_images(samples, 32, rejects)
    assert len(kept) == 6 and images.shape == (6, 3, 32, 32)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(os.path.basename(p) for p, _ in rejects.items[1:]) == ["zz_empty.JPEG", "zz_text.JPEG"]
    out = tmp_path / "rejects.tsv"
    rejects.write(out)
    assert len(out.read_text().splitlines()) == 3


def test_strict_fails_at_first_bad_file_naming_it(tmp_path):
    root = _tree(tmp_path)
    samples, _ = class_folder_source(root, Rejects(strict=False))
    with pytest.raises(BadSourceError, match=r"zz_empty\.JPEG: empty file"):
        load_images(samples, 32, Rejects(strict=True))
    with pytest.raises(BadSourceError, match="empty class folder"):
        class_folder_source(root, Rejects(strict=True))


def test_label_file_missing_image_out_of_range_and_malformed(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    _jpeg(folder / "ILSVRC2012_val_00000001.JPEG")
    _jpeg(folder / "ILSVRC2012_val_00000002.JPEG")
    labels = tmp_path / "val.txt"
    labels.write_text(
        "ILSVRC2012_val_00000001.JPEG 65\n"
        "ILSVRC2012_val_00000002.JPEG 1000\n"
        "ILSVRC2012_val_00000003.JPEG 5\n"
        "just-a-name\n"
    )
    rejects = Rejects()
    samples = label_file_source(folder, labels, rejects)
    assert [(s.key, s.label, s.wnid) for s in samples] == [("ILSVRC2012_val_00000001", 65, "n01751748")]
    reason = {next(k for k in ("out of range", "missing image", "malformed line") if k in r): p for p, r in rejects.items}
    assert len(rejects) == 3 and reason["missing image"].endswith("ILSVRC2012_val_00000003.JPEG")
    assert reason["malformed line"].endswith("val.txt:4") and reason["out of range"].endswith("val.txt:2")


def test_wnid_folders_map_to_timm_imagenet_indices(tmp_path):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    for idx in (0, 1, 417, 999):
        (tmp_path / info.index_to_label_name(idx)).mkdir()
        _jpeg(tmp_path / info.index_to_label_name(idx) / f"img_{idx}.JPEG")
    samples, classes = class_folder_source(tmp_path, Rejects())
    assert len(classes) == 1000
    assert [(s.label, s.wnid) for s in samples] == [(i, info.index_to_label_name(i)) for i in (0, 1, 417, 999)]


def test_keys_have_no_dots(tmp_path):
    (tmp_path / "c").mkdir()
    _jpeg(tmp_path / "c" / "photo.v2.final.jpg")
    samples, _ = class_folder_source(tmp_path, Rejects())
    assert samples[0].key == "photo_v2_final"


def test_crop_equals_timm_eval_transform(tmp_path):
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    p = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (61, 90, 3), dtype=np.uint8)).save(p)
    tf = create_transform(input_size=32, crop_pct=0.875, interpolation="bicubic", is_training=False)
    pil_steps = [t for t in tf.transforms if type(t).__name__ in ("Resize", "CenterCrop", "ResizeKeepRatio")]
    expected = Image.open(p).convert("RGB")
    for t in pil_steps:
        expected = t(expected)
    np.testing.assert_array_equal(load_crop(p, 32, crop_pct=0.875), np.asarray(expected))



# ---- reliability cases (each failed before its fix) ----------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored sideways with orientation 6 ("rotate 90 clockwise to view") is cropped as viewed."""
    stored = np.zeros((40, 64, 3), dtype=np.uint8)
    stored[:, :32] = (250, 0, 0)  # red left half as stored: after the rotation it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(p, "JPEG", quality=100, exif=exif)
    crop = load_crop(p, 32, crop_pct=1.0).astype(int)
    assert crop[:8, :, 0].mean() > 200 and crop[-8:, :, 0].mean() < 50


def test_hidden_folders_are_ignored_and_a_wnid_mix_is_an_error(tmp_path):
    from timm.data import ImageNetInfo

    tench, goldfish = ImageNetInfo().index_to_label_name(0), ImageNetInfo().index_to_label_name(1)
    for name in (tench, goldfish, ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
        _jpeg(tmp_path / name / f"{name.strip('.')}_0.JPEG")
    samples, _ = class_folder_source(tmp_path, Rejects())
    assert [(s.wnid, s.label) for s in samples] == [(tench, 0), (goldfish, 1)]
    (tmp_path / "scratch").mkdir()
    _jpeg(tmp_path / "scratch" / "x.JPEG")
    with pytest.raises(BadSourceError, match=r"mixed with 1 other folder\(s\) \['scratch'\]"):
        class_folder_source(tmp_path, Rejects())


def test_label_file_bad_digits_bytes_and_paths_are_rejected_by_line(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    _jpeg(folder / "good.JPEG")
    _jpeg(tmp_path / "outside.JPEG")
    labels = tmp_path / "val.txt"
    labels.write_bytes("good.JPEG 1\ngood.JPEG \u00b2\n".encode() + b"caf\xe9.JPEG 3\n"
                       + f"../outside.JPEG 4\n{tmp_path / 'outside.JPEG'} 5\n".encode())
    rejects = Rejects()
    samples = label_file_source(folder, labels, rejects)
    assert [(s.key, s.label) for s in samples] == [("good", 1)]
    by_line = {where.rsplit(":", 1)[1]: reason for where, reason in rejects.items}
    assert "malformed line" in by_line["2"] and "not valid UTF-8" in by_line["3"]
    assert "outside" in by_line["4"] and "outside" in by_line["5"]


def test_rejects_tsv_escapes_tabs_and_newlines_in_file_names(tmp_path):
    from sources.reading import tsv_unescape

    rejects = Rejects()
    names = [str(tmp_path / "tab\there.JPEG"), str(tmp_path / "new\nline.JPEG"), str(tmp_path / "back\\slash.JPEG")]
    for n in names:
        rejects.add(n, "empty file (0 bytes)")
    out = tmp_path / "rejects.tsv"
    rejects.write(out)
    rows = [line.split("\t") for line in out.read_text().split("\n")[:-1]]
    assert [len(r) for r in rows] == [2, 2, 2]
    assert [tsv_unescape(r[0]) for r in rows] == names


def test_names_differing_in_case_and_same_name_in_two_classes_are_all_kept(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
    paths = [_jpeg(tmp_path / "a" / "IMG_1.JPEG"), _jpeg(tmp_path / "a" / "img_1.jpg"),
             _jpeg(tmp_path / "b" / "IMG_1.JPEG"), _jpeg(tmp_path / "b" / "other.JPEG")]
    rejects = Rejects()
    samples, _ = class_folder_source(tmp_path, rejects)
    assert len(rejects) == 0 and sorted(s.path for s in samples) == sorted(paths)
    keys = [s.key for s in samples]
    assert len({k.casefold() for k in keys}) == 4 and all("." not in k for k in keys)
    assert "other" in keys  # keys that do not clash stay the file stem
    assert keys == [s.key for s in class_folder_source(tmp_path, Rejects())[0]]  # deterministic
