"""The five FGVC sets in VPT's layout (Jia et al., ECCV 2022): CUB-200-2011, NABirds, Oxford Flowers,
Stanford Dogs and Stanford Cars.

    <root>/<folder>/{train,val,test}.json     {"relative/image/path": class_id, ...}
    <root>/<folder>/images/...                 CUB and NABirds
    <root>/<folder>/...                        Flowers, Dogs, Cars: paths relative to the folder

Class ids are remapped to 0..K-1 in sorted order, as VPT does, from the ids of all three files; K is checked
against the table. Images are decoded once at the training resolution (bicubic) and cached like VTAB's; every
path in the json files must stay inside the set's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .base import DataNotFoundError, DatasetError, ImageDataset, data_root
from .lists import load_json
from .vtab import Task, decode_list

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
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{path}: expected a non-empty mapping of image path to integer class id")
    bad = next(((k, v) for k, v in data.items() if type(v) is not int or v < 0), None)
    if bad is not None:
        raise DatasetError(f"{path}: {bad[0]!r} has class id {bad[1]!r}; ids must be non-negative integers")
    return data


def load_fgvc(name: str, split: str, root=None, image_size: int = 224, workers: int | None = None,
              progress: bool = True) -> ImageDataset:
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
    items = [(rel, c, 0) for rel, c in sorted(maps[split].items())]
    images_folder = folder / spec.images if spec.images else folder
    store, counts = decode_list(images_folder, items, image_size, folder / f"{split}.json", f"fgvc-{name}-{split}",
                                workers, progress)
    labels = torch.tensor([remap[c] for _, c, _ in items], dtype=torch.int64)
    return ImageDataset(store, labels, [str(c) for c in ids], f"fgvc:{name}-{split}", load_counts=counts)
