"""The embedded demo world: a seeded, procedural shapes-and-textures classification set.

Written as an ImageNet-style tree (``<root>/<split>/<class>/<key>.JPEG``) so the real source-reading path is used.
Every image is drawn from its own RNG stream ``(seed, split, index)``, so an image's bytes do not depend on how
many images are generated or in which order. Colours are random for every class: a class is told apart by
shape or texture alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

SPLITS = {"train": 0, "val": 1, "test": 2, "outlier": 3}
_SUPERSAMPLE = 3  # draw at 3x and downsample with a box filter: anti-aliased edges


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Foreground mask in the object's own frame (u, v in units of the object radius)."""
    r = np.hypot(u, v)
    if kind == "disc":
        return r <= 1.0
    if kind == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if kind == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if kind == "triangle":
        return (v <= 0.7) & (abs(u) <= (v + 0.9) * 0.6)  # apex up, base down
    if kind == "plus":
        return ((abs(u) <= 0.28) & (abs(v) <= 1.0)) | ((abs(v) <= 0.28) & (abs(u) <= 1.0))
    raise ValueError(kind)


def _texture_mask(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture over the whole image; x, y in pixels of the final image."""
    period = rng.uniform(5.0, 8.0)
    phase = rng.uniform(0, period)
    if kind == "hstripes":
        return ((y + phase) % period) < period / 2
    if kind == "vstripes":
        return ((x + phase) % period) < period / 2
    if kind == "diagonal":
        return ((x + y + phase) % period) < period / 2
    if kind == "checker":
        return (((x + phase) // (period / 2)) + ((y + phase) // (period / 2))) % 2 == 0
    if kind == "dots":
        cx = (x + phase) % period - period / 2
        cy = (y + phase) % period - period / 2
        return np.hypot(cx, cy) <= period * 0.28
    raise ValueError(kind)


SHAPES = ("disc", "ring", "square", "triangle", "plus")
TEXTURES = ("hstripes", "vstripes", "diagonal", "checker", "dots")
CLASSES = SHAPES + TEXTURES


def _distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random background and foreground colours far enough apart to be seen (contrast, not hue, carries class)."""
    while True:
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.abs(bg - fg).mean() > 60:
            return bg, fg


def render(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 HxWx3 image of the given class."""
    n = size * _SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / _SUPERSAMPLE
    bg, fg = _distinct_colours(rng)
    if class_name in SHAPES:
        radius = rng.uniform(0.25, 0.4) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        theta = rng.uniform(-0.35, 0.35)  # small rotations keep squares square and triangles upright
        u = ((x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)) / radius
        v = (-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)) / radius
        mask = _shape_mask(class_name, u, v)
    else:
        mask = _texture_mask(class_name, x, y, rng)
    img = np.where(mask[..., None], fg, bg)
    img = img + rng.normal(0, 8.0, img.shape)  # sensor-like noise so no class is a flat template
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


# Outlier families for OOD work: procedurally different from every class (no single shape, no periodic texture).
OUTLIER_FAMILIES = ("smooth_noise", "gradient", "blobs", "scribbles")


def render_outlier(family: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 HxWx3 image of an outlier family."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    if family == "smooth_noise":  # a coarse random colour grid, bicubically upsampled
        grid = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8))
        img = np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)).astype(float)
    elif family == "gradient":  # a linear blend between two colours along a random direction
        a, b = _distinct_colours(rng)
        theta = rng.uniform(0, 2 * np.pi)
        t = (x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta)
        t = (t - t.min()) / (t.max() - t.min())
        img = a * (1 - t[..., None]) + b * t[..., None]
    elif family == "blobs":  # a few soft Gaussian blobs of random colours
        img = np.tile(rng.uniform(0, 255, 3), (size, size, 1))
        for _ in range(rng.integers(2, 5)):
            cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.25)
            w = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2))[..., None]
            img = img * (1 - w) + rng.uniform(0, 255, 3) * w
    elif family == "scribbles":  # random thick strokes
        bg, fg = _distinct_colours(rng)
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(2, 5)):
            (x0, y0), (x1, y1) = rng.uniform(0, 1, (2, 2))
            t = np.clip(((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-9), 0, 1)
            mask |= np.hypot(x - x0 - t * (x1 - x0), y - y0 - t * (y1 - y0)) < rng.uniform(0.03, 0.07)
        img = np.where(mask[..., None], fg, bg)
    else:
        raise ValueError(f"unknown outlier family {family!r} (choose from {', '.join(OUTLIER_FAMILIES)})")
    img = img + rng.normal(0, 8.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_demo_world(
    root: Path | str,
    seed: int = 0,
    size: int = 32,
    counts: dict[str, int] | None = None,
    quality: int = 95,
    outliers: int = 0,
) -> dict[str, int]:
    """Write the demo world under ``root``; returns the number of images per split.

    ``counts`` gives images per split (divided evenly over the classes); ``outliers`` images per outlier family
    go to ``<root>/outliers/<family>/``.
    """
    counts = {"train": 5000, "val": 1000} if counts is None else counts
    root = Path(root)
    written = {}
    for split, total in counts.items():
        per_class = total // len(CLASSES)
        jobs = [(c, i) for c in range(len(CLASSES)) for i in range(per_class)]
        for c, i in tqdm(jobs, desc=f"demo world {split}", unit="img", mininterval=2):
            index = c * per_class + i
            rng = np.random.default_rng([seed, SPLITS[split], index])
            folder = root / split / f"{c:02d}_{CLASSES[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(CLASSES[c], size, rng)).save(
                folder / f"demo_{split}_{index:06d}.JPEG", quality=quality
            )
        written[split] = len(jobs)
    for f, family in enumerate(OUTLIER_FAMILIES if outliers else ()):
        folder = root / "outliers" / family
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(outliers):
            rng = np.random.default_rng([seed, SPLITS["outlier"], f, i])
            Image.fromarray(render_outlier(family, size, rng)).save(folder / f"{family}_{i:06d}.JPEG", quality=quality)
        written[f"outliers/{family}"] = outliers
    return written
