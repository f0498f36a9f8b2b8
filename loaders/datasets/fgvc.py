"""The five FGVC sets in VPT's layout (Jia et al., ECCV 2022): CUB-200-2011, NABirds, Oxford Flowers,
Stanford Dogs and Stanford Cars.

    <root>/<folder>/{train,val,test}.json     {"relative/image/path": class_id, ...}
    <root>/<folder>/images/...                 CUB and NABirds
    <root>/<folder>/...                        Flowers, Dogs, Cars: paths relative to the folder

Class ids are remapped to 0..K-1 in sorted order, as VPT does, from the ids of all three files; K is checked
against the table. Images are decoded once at the training resolution (bicubic) and cached like VTAB's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DataNotFoundError, DatasetError, ImageDataset, data_root
from .vtab import Task, decode_cached

FGVC_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FGVCSet:
    folder: str  # under the data root, as VPT's data preparation names it
    images: str  # sub-folder the json paths are relative to ("" = the folder itself)
    task: Task  # classes and the official RLRR recipe (flip unused: VPT's FGVC pipeline flips every set)


FGVC_SETS: dict[str, FGVCSet] = {
    "cub": FGVCSet("CUB_200_2011", "images", Task("FGVC", 200, 3e-3, 0.1, 5e-2, True)),
    "nabirds": FGVCSet("nabirds", "images", Task("FGVC", 555, 5e-4, 0.3, 5e-2, True)),
    "flowers": FGVCSet("OxfordFlower", "", Task("FGVC", 102, 3e-3, 0.2, 5e-2, True)),
    "dogs": FGVCSet("Stanford-dogs", "", Task("FGVC", 120, 1e-4, 0.0, 5e-2, True)),
    "cars": FGVCSet("Stanford-cars", "", Task("FGVC", 196, 3e-3, 0.2, 5e-2, True)),
}


def _read(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found: an FGVC folder in VPT's layout holds train.json, val.json and "
                                "test.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not data or not all(isinstance(v, int) for v in data.values()):
        raise DatasetError(f"{path}: expected a non-empty mapping of image path to integer class id")
    return data


def load_fgvc(name: str, split: str, root=None, image_size: int = 224) -> ImageDataset:
    if name not in FGVC_SETS:
        raise DataNotFoundError(f"unknown FGVC set {name!r}; the sets are {', '.join(FGVC_SETS)}")
    if split not in FGVC_SPLITS:
        raise ValueError(f"FGVC split must be one of {', '.join(FGVC_SPLITS)}, got {split!r}")
    spec = FGVC_SETS[name]
    folder = data_root(root) / spec.folder
    if not folder.is_dir():
        raise DataNotFoundError(f"FGVC folder {folder} not found: expected <data-root>/{spec.folder}/ with "
                                "train.json, val.json, test.json (VPT's layout)")
    maps = {s: _read(folder / f"{s}.json") for s in FGVC_SPLITS}
    ids = sorted({c for m in maps.values() for c in m.values()})
    if len(ids) != spec.task.classes:
        raise DatasetError(f"{folder}: the json files hold {len(ids)} class ids, {name} has {spec.task.classes}")
    remap = {c: i for i, c in enumerate(ids)}  # VPT: sorted original ids -> 0..K-1
    items = sorted(maps[split].items())
    key = hashlib.sha256(json.dumps(items).encode()).hexdigest()
    images = decode_cached(folder / spec.images if spec.images else folder, items, image_size, key, split)
    labels = torch.tensor([remap[c] for _, c in items], dtype=torch.int64)
    return ImageDataset(torch.from_numpy(images), labels, [str(c) for c in ids], f"fgvc:{name}-{split}")
