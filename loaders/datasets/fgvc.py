"""The five FGVC sets in VPT's layout (Jia et al., ECCV 2022): CUB-200-2011, NABirds, Oxford Flowers,
Stanford Dogs and Stanford Cars.

    <root>/<folder>/{train,val,test}.json     {"relative/image/path": class_id, ...}
    <root>/<folder>/images/...                 CUB and NABirds
    <root>/<folder>/...                        Flowers, Dogs, Cars: paths relative to the folder

The folder names of VPT's preparation and of the official RLRR code (``CUB_200_2011``, ``NABirds``,
``OxfordFlowers``, ``StanfordDogs``, ``StanfordCars``; zstarN70/RLRR ``RLRRDatasets/FGVCDataLoader.py``
``_DATASET_CATALOG``) are both accepted. ``trainval`` is ``trainval.json`` where the folder has one (the official
loader reads that file), else the union of train.json and val.json.

Class ids are remapped to 0..K-1 in sorted order, as VPT does, from the ids of all the files; K is checked
against the table (the official code remaps per file, which is the same map whenever each file holds every
class). Images are stored as the official RLRR pipeline resizes them, 256 × 256 bilinear for 224 px
(``RLRRDatasets/fgvc_tranforms.py``: ``Resize((256, 256))``; other sizes scale by 256/224), and cached like
VTAB's; the 224 crops are cut on the device (random for training, centre for testing). Every path in the json
files must stay inside the set's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..images import StorePolicy
from .base import DataNotFoundError, DatasetError, ImageDataset, data_root
from .lists import load_json
from .vtab import Task, decode_list

FGVC_SPLITS = ("train", "val", "test", "trainval")
STORE_SIDE = 256  # the official resize for 224 px crops (RLRRDatasets/fgvc_tranforms.py: Resize((256, 256)))


@dataclass(frozen=True)
class FGVCSet:
    folder: str  # under the data root, as VPT's data preparation names it
    images: str  # sub-folder the json paths are relative to ("" = the folder itself)
    task: Task  # classes and the official RLRR recipe (RLRRDatasets/FGVCConfig.py; every set is flipped)
    official: str = ""  # the folder name in the official RLRR code, accepted too


FGVC_SETS: dict[str, FGVCSet] = {
    "cub": FGVCSet("CUB_200_2011", "images", Task("FGVC", 200, 3e-3, 0.1, 5e-2, True), "CUB_200_2011"),
    "nabirds": FGVCSet("nabirds", "images", Task("FGVC", 555, 5e-4, 0.3, 5e-2, True), "NABirds"),
    "flowers": FGVCSet("OxfordFlower", "", Task("FGVC", 102, 3e-3, 0.2, 5e-2, True), "OxfordFlowers"),
    "dogs": FGVCSet("Stanford-dogs", "", Task("FGVC", 120, 1e-4, 0.0, 5e-2, True), "StanfordDogs"),
    "cars": FGVCSet("Stanford-cars", "", Task("FGVC", 196, 3e-3, 0.2, 5e-2, True), "StanfordCars"),
}


def store_side(image_size: int) -> int:
    """The stored square side for ``image_size`` crops: 256 for 224, scaled alike for other sizes."""
    return round(image_size * STORE_SIDE / 224)


def set_folder(name: str, root=None) -> Path:
    """The set's folder under the data root: VPT's name or the official RLRR code's, whichever exists."""
    spec = FGVC_SETS[name]
    base = data_root(root)
    names = dict.fromkeys([spec.folder, spec.official or spec.folder])
    for candidate in names:
        if (base / candidate).is_dir():
            return base / candidate
    raise DataNotFoundError(f"FGVC folder {base / spec.folder} not found: expected <data-root>/"
                            f"{' or '.join(names)}/ with train.json, val.json, test.json (VPT's layout)")


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
    folder = set_folder(name, root)
    maps = {s: _read(folder / f"{s}.json") for s in ("train", "val", "test")}
    if (folder / "trainval.json").is_file():
        maps["trainval"] = _read(folder / "trainval.json")
    else:
        both = set(maps["train"]) & set(maps["val"])
        clash = next((k for k in sorted(both) if maps["train"][k] != maps["val"][k]), None)
        if clash is not None:
            raise DatasetError(f"{folder}: {clash!r} has class {maps['train'][clash]} in train.json and "
                               f"{maps['val'][clash]} in val.json")
        maps["trainval"] = {**maps["train"], **maps["val"]}
    ids = sorted({c for m in maps.values() for c in m.values()})
    if len(ids) != spec.task.classes:
        raise DatasetError(f"{folder}: the json files hold {len(ids)} class ids, {name} has {spec.task.classes}")
    remap = {c: i for i, c in enumerate(ids)}  # VPT: sorted original ids -> 0..K-1
    items = [(rel, c, 0) for rel, c in sorted(maps[split].items())]
    images_folder = folder / spec.images if spec.images else folder
    policy = StorePolicy("square", store_side(image_size), resample="bilinear")
    list_name = folder / f"{split}.json" if split != "trainval" or (folder / "trainval.json").is_file() else folder
    store, counts = decode_list(images_folder, items, image_size, list_name, f"fgvc-{name}-{split}", workers, progress,
                                policy=policy)
    labels = torch.tensor([remap[c] for _, c, _ in items], dtype=torch.int64)
    return ImageDataset(store, labels, [str(c) for c in ids], f"fgvc:{name}-{split}", load_counts=counts)
