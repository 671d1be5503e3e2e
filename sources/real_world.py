"""The embedded real world: photographs that ship inside installed Python packages, each given a true ImageNet-1k
class by hand (by what the photo shows, not by what a model predicts).

Written in both layouts DAmageNet users meet: an ILSVRC2012-style val tree (``<root>/val/<wnid>/<photo>``, read by
``source.kind: class_folder``) and the official DAmageNet layout, a flat folder plus ``val.txt`` lines
``<file> <index>`` (``source.kind: label_file``). Files are copied byte for byte, so the world is deterministic and
the prepare stage meets the photos' own formats (PNG, grey-scale PNG, JPEG).
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Photo:
    name: str  # short name (the file stem in both layouts)
    package: str  # the package that ships it
    path: str  # path inside the package's data folder
    wnid: str  # the true ImageNet-1k class: WordNet id ...
    index: int  # ... its index in the 1000-class order ...
    label: str  # ... and its name

    def file(self) -> Path:
        """The installed file; a clear error naming the package when it is missing."""
        try:
            module = importlib.import_module(self.package.split(":")[0])
        except ImportError:
            raise FileNotFoundError(f"photo {self.name!r}: package {self.package.split(':')[0]} is not installed "
                                    "(pip install '.[real]')") from None
        if self.package == "matplotlib":
            base = Path(module.get_data_path()) / "sample_data"
        else:
            base = Path(module.__file__).parent / self.package.split(":")[1]
        found = base / self.path
        if not found.is_file():
            raise FileNotFoundError(f"photo {self.name!r}: {found} not found in the installed {self.package}")
        return found


PHOTOS = [
    Photo("chelsea", "skimage:data", "chelsea.png", "n02123045", 281, "tabby cat"),
    Photo("coffee", "skimage:data", "coffee.png", "n07920052", 967, "espresso"),
    Photo("rocket", "skimage:data", "rocket.jpg", "n03773504", 657, "missile"),
    # ImageNet-1k has no motorcycle class; moped is the nearest (its images include light motorbikes)
    Photo("motorcycle", "skimage:data", "motorcycle_left.png", "n03785016", 665, "moped"),
    Photo("camera", "skimage:data", "camera.png", "n04485082", 872, "tripod"),  # grey-scale
    Photo("clock", "skimage:data", "clock_motion.png", "n04548280", 892, "wall clock"),  # grey-scale, motion blur
    Photo("china", "sklearn:datasets/images", "china.jpg", "n03877845", 698, "palace"),
    # a dahlia: ImageNet-1k's flower classes are daisy and yellow lady's slipper (an orchid); daisy is the nearer
    Photo("flower", "sklearn:datasets/images", "flower.jpg", "n11939491", 985, "daisy"),
    Photo("grace_hopper", "matplotlib", "grace_hopper.jpg", "n03763968", 652, "military uniform"),
]


def select_photos(names: list[str] | None) -> list[Photo]:
    """The photos named (all when ``names`` is None), in table order; an unknown name is an error listing the known."""
    if names is None:
        return list(PHOTOS)
    known = {p.name for p in PHOTOS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; known: {sorted(known)}")
    return [p for p in PHOTOS if p.name in names]


def write_real_world(root: Path | str, photos: list[Photo]) -> dict[str, int]:
    """Write both layouts under ``root`` (which must not exist yet): ``val/<wnid>/<name><ext>``, ``flat/<name><ext>``
    and ``val.txt``. Returns image counts per layout."""
    root = Path(root)
    lines = []
    for photo in photos:
        src = photo.file()
        name = photo.name + src.suffix.lower()
        (root / "val" / photo.wnid).mkdir(parents=True, exist_ok=True)
        (root / "flat").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / "val" / photo.wnid / name)
        shutil.copyfile(src, root / "flat" / name)
        lines.append(f"{name} {photo.index}\n")
    (root / "val.txt").write_text("".join(lines))
    return {"class_folder": len(photos), "label_file": len(lines)}
