"""The embedded real world: photographs that ship inside installed Python packages, each given a true ImageNet-1k
class by hand (by what the photo shows, not by what a model predicts).

Written in both layouts DAmageNet users meet: an ILSVRC2012-style val tree (``<root>/val/<wnid>/<photo>``, read by
``source.kind: class_folder``) and the official DAmageNet layout, a flat folder plus ``val.txt`` lines
``<file> <index>`` (``source.kind: label_file``); with ``real.json``, each photo's hand-checked set of acceptable
classes (the ImageNet-ReaL convention: every class a careful labeller would accept for what the photo shows, so
tabby, tiger cat and Egyptian cat for the cat). Files are copied byte for byte, so the world is deterministic and
the prepare stage meets the photos' own formats (PNG, grey-scale PNG, JPEG).
"""

from __future__ import annotations

import importlib
import json
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
    accept: tuple[int, ...]  # the classes acceptable for the photo (its label among them), checked by eye

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
    # a tabby; ImageNet's three house-cat classes overlap (ReaL merges them)
    Photo("chelsea", "skimage:data", "chelsea.png", "n02123045", 281, "tabby cat", (281, 282, 285)),
    Photo("coffee", "skimage:data", "coffee.png", "n07920052", 967, "espresso", (967, 968)),  # in a cup
    # ImageNet has the same object twice: missile and projectile, missile
    Photo("rocket", "skimage:data", "rocket.jpg", "n03773504", 657, "missile", (657, 744)),
    # ImageNet-1k has no motorcycle class; moped and motor scooter are the nearest (light motorbikes)
    Photo("motorcycle", "skimage:data", "motorcycle_left.png", "n03785016", 665, "moped", (665, 670)),
    # grey-scale: a photographer with a camera on a tripod
    Photo("camera", "skimage:data", "camera.png", "n04485082", 872, "tripod", (759, 872)),
    # grey-scale, motion blur: a round clock face (wall clock and analog clock)
    Photo("clock", "skimage:data", "clock_motion.png", "n04548280", 892, "wall clock", (409, 892)),
    # the Tower of Buddhist Incense (Summer Palace): palace, and a temple complex (monastery)
    Photo("china", "sklearn:datasets/images", "china.jpg", "n03877845", 698, "palace", (663, 698)),
    # a dahlia: ImageNet-1k's flower classes are daisy and yellow lady's slipper (an orchid); daisy is the nearer
    Photo("flower", "sklearn:datasets/images", "flower.jpg", "n11939491", 985, "daisy", (985,)),
    # a navy uniform with a black bow tie
    Photo("grace_hopper", "matplotlib", "grace_hopper.jpg", "n03763968", 652, "military uniform", (457, 652)),
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
    and ``val.txt``, and the label sets ``real.json`` (file name -> acceptable classes, read by either layout).
    Returns image counts per layout."""
    root = Path(root)
    lines, label_sets = [], {}
    for photo in photos:
        src = photo.file()
        name = photo.name + src.suffix.lower()
        (root / "val" / photo.wnid).mkdir(parents=True, exist_ok=True)
        (root / "flat").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / "val" / photo.wnid / name)
        shutil.copyfile(src, root / "flat" / name)
        lines.append(f"{name} {photo.index}\n")
        label_sets[name] = sorted(photo.accept)
    (root / "val.txt").write_text("".join(lines))
    (root / "real.json").write_text(json.dumps(label_sets, indent=1, sort_keys=True) + "\n")
    return {"class_folder": len(photos), "label_file": len(lines)}
