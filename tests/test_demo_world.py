"""The demo world: seeded determinism, per-image independence, and classes that colour alone cannot tell apart."""

from __future__ import annotations

import hashlib

import numpy as np

from sources.demo_world import CLASSES, generate_demo_world
from sources.reading import Rejects, class_folder_source, load_images


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.JPEG"))}


def test_same_seed_gives_identical_bytes(tmp_path):
    a = _digests_after(tmp_path / "a", seed=3)
    b = _digests_after(tmp_path / "b", seed=3)
    c = _digests_after(tmp_path / "c", seed=4)
    assert a == b and len(a) == 40
    assert set(a.values()).isdisjoint(c.values())


def _digests_after(root, seed, train=20):
    generate_demo_world(root, seed=seed, size=32, counts={"train": train, "val": 20})
    return _digests(root)


def test_an_image_does_not_depend_on_how_many_are_generated(tmp_path):
    small = _digests_after(tmp_path / "small", seed=0, train=20)
    large = _digests_after(tmp_path / "large", seed=0, train=40)
    # image index i of class c is drawn from its own stream: the val split is identical in both
    assert {k: v for k, v in small.items() if k.startswith("val")} == {k: v for k, v in large.items() if k.startswith("val")}


def test_layout_is_imagenet_style_class_folders(small_world):
    samples, classes = class_folder_source(small_world / "train", Rejects())
    assert len(classes) == len(CLASSES) >= 10
    assert len(samples) == 600 and sorted({s.label for s in samples}) == list(range(10))


def test_colour_alone_does_not_tell_classes_apart(small_world):
    """A nearest-centroid classifier on mean colour stays near chance; shape/texture carry the class."""
    rejects = Rejects()
    x, y, _ = load_images(class_folder_source(small_world / "train", rejects)[0], 32, rejects)
    xv, yv, _ = load_images(class_folder_source(small_world / "val", rejects)[0], 32, rejects)
    feats = x.float().mean((2, 3)).numpy()
    centroids = np.stack([feats[y.numpy() == c].mean(0) for c in range(10)])
    fv = xv.float().mean((2, 3)).numpy()
    pred = np.argmin(((fv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yv.numpy()).mean() < 0.25  # chance is 0.10
