"""VTAB-1k (Zhai et al., 2019) in the extracted layout shared by NOAH, SSF and the official RLRR code.

    <root>/<task>/{train800,val200,train800val200,test}.txt     lines "relative/image/path label"
    <root>/<task>/<images ...>

The class count of each task comes from :data:`VTAB_TASKS` (with its group and the official RLRR recipe) and
is checked against the labels found. Images are decoded once, resized to the training resolution with PIL's
bicubic filter (as the official pipeline), and kept in the decode cache (``loaders.datasets.cache``: in
``<task>/.vit-peft-cache/`` or $VIT_PEFT_CACHE, keyed by every listed file's path, size and time), so 19 tasks ×
several methods do not decode JPEGs every epoch. Every listed path must stay inside the task folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import StorePolicy
from .base import DataNotFoundError, DatasetError, ImageDataset, data_root
from .cache import decode_cached
from .lists import inside, parse_label, read_text
from .store import PixelStore

log = logging.getLogger(__name__)

VTAB_LISTS = ("train800", "val200", "train800val200", "test")


@dataclass(frozen=True)
class Task:
    """A benchmark task: its group, class count and the official RLRR recipe (zstarN70/RLRR configs)."""

    group: str
    classes: int
    lr: float
    drop_path: float
    weight_decay: float
    flip: bool


_N, _S, _T = "Natural", "Specialized", "Structured"
VTAB_TASKS: dict[str, Task] = {
    "cifar": Task(_N, 100, 3e-3, 0.1, 5e-5, False),
    "caltech101": Task(_N, 102, 1e-3, 0.1, 5e-5, False),
    "dtd": Task(_N, 47, 2e-3, 0.1, 5e-5, True),
    "oxford_flowers102": Task(_N, 102, 3e-3, 0.3, 5e-2, False),
    "oxford_iiit_pet": Task(_N, 37, 1e-3, 0.1, 5e-5, True),
    "svhn": Task(_N, 10, 5e-3, 0.3, 5e-5, False),
    "sun397": Task(_N, 397, 1e-3, 0.1, 5e-5, False),
    "patch_camelyon": Task(_S, 2, 3e-3, 0.3, 5e-2, True),
    "eurosat": Task(_S, 10, 1e-3, 0.1, 5e-5, True),
    "resisc45": Task(_S, 45, 3e-3, 0.0, 5e-5, False),
    "diabetic_retinopathy": Task(_S, 5, 5e-3, 0.1, 5e-5, True),
    "clevr_count": Task(_T, 8, 5e-3, 0.5, 5e-5, True),
    "clevr_dist": Task(_T, 6, 1e-2, 0.2, 5e-5, True),
    "dmlab": Task(_T, 6, 5e-3, 0.3, 5e-5, True),
    "kitti": Task(_T, 4, 3e-3, 0.3, 5e-2, True),
    "dsprites_loc": Task(_T, 16, 1e-2, 0.1, 5e-5, False),
    "dsprites_ori": Task(_T, 16, 5e-3, 0.1, 5e-5, False),
    "smallnorb_azi": Task(_T, 18, 5e-3, 0.3, 5e-2, False),
    "smallnorb_ele": Task(_T, 9, 1e-3, 0.3, 5e-5, True),
}
# Offline rehearsal tasks (Fashion-MNIST cut VTAB-style by the suite tool): not VTAB, never mixed into its means.
REHEARSAL_TASKS: dict[str, Task] = {
    "fmnist_clothes": Task("Rehearsal", 5, 3e-3, 0.1, 5e-5, False),
    "fmnist_shoes_bags": Task("Rehearsal", 5, 3e-3, 0.1, 5e-5, False),
}
GROUPS = (_N, _S, _T)


def task_info(task: str) -> Task:
    table = {**VTAB_TASKS, **REHEARSAL_TASKS}
    if task not in table:
        raise DataNotFoundError(f"unknown VTAB-1k task {task!r}; the tasks are {', '.join(VTAB_TASKS)}")
    return table[task]


def read_list(path: Path) -> list[tuple[str, int, int]]:
    """``relative/path label`` lines as (path, label, line number); a malformed line is an error naming the file
    and line (labels are plain decimal integers; the text is UTF-8)."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found: a VTAB-1k task folder holds {', '.join(f'{n}.txt' for n in VTAB_LISTS)}"
                                f" beside its images")
    items = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name:
            raise DatasetError(f"{path}:{n}: expected 'relative/image/path label', got {line!r}")
        items.append((name, parse_label(label, f"{path}:{n}"), n))
    if not items:
        raise DatasetError(f"{path} lists no images")
    return items


def decode_list(folder: Path, items, image_size: int, list_path: Path, name: str, workers: int | None = None,
                progress: bool = True, policy: StorePolicy | None = None) -> tuple[PixelStore, dict]:
    """The images of a benchmark list (paths inside ``folder``), squashed to image_size² with PIL bicubic as the
    official pipelines do (or as ``policy`` says), through the decode cache. Every listed file must decode: the
    protocol's counts are fixed, so a missing or broken file is an error naming it."""
    files = [inside(folder, rel, f"{list_path}:{n}" if n else str(list_path)) for rel, _, n in items]
    policy = policy or StorePolicy("square", image_size)
    store, report = decode_cached(files, folder, name, policy, workers, progress)
    if report.reasons:
        i, why = min(report.reasons.items())
        raise DatasetError(f"{files[i]} is listed in {list_path} but cannot be read ({why})"
                           + (f"; {len(report.reasons) - 1} more" if len(report.reasons) > 1 else ""))
    return store, report.counts()


def load_vtab(task: str, split: str, root=None, image_size: int = 224, workers: int | None = None,
              progress: bool = True) -> ImageDataset:
    """One list of a VTAB-1k task (``split`` in train800, val200, train800val200, test) as an ImageDataset.
    ``ds.load_counts`` says how many images were decoded and how many came from the cache."""
    info = task_info(task)
    if split not in VTAB_LISTS:
        raise ValueError(f"VTAB-1k split must be one of {', '.join(VTAB_LISTS)}, got {split!r}")
    folder = data_root(root) / task
    if not folder.is_dir():
        raise DataNotFoundError(f"VTAB-1k task folder {folder} not found: expected <data-root>/{task}/ with "
                                f"{', '.join(f'{n}.txt' for n in VTAB_LISTS)} (the extracted vtab-1k release)")
    list_path = folder / f"{split}.txt"
    items = read_list(list_path)
    labels = np.array([label for _, label, _ in items], np.int64)
    if labels.min() < 0 or labels.max() >= info.classes:
        raise DatasetError(f"{list_path}: labels span {labels.min()}..{labels.max()}, but {task} has "
                           f"{info.classes} classes (0..{info.classes - 1})")
    store, counts = decode_list(folder, items, image_size, list_path, f"vtab-{task}-{split}", workers, progress)
    return ImageDataset(store, torch.from_numpy(labels), [str(c) for c in range(info.classes)],
                        f"vtab-1k:{task}-{split}", load_counts=counts)


def write_vtab_task(folder, train: ImageDataset, test: ImageDataset, seed: int = 0, sizes=(800, 200, 1000)) -> Path:
    """Cut a dataset VTAB-1k style into ``folder``: PNG files and the four lists (800 train, 200 val, their union,
    1000 test by default), drawn at random (seeded) from ``train`` and ``test``. Used for the offline rehearsal."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n_train, n_val, n_test = sizes
    picked = torch.randperm(len(train), generator=g)[:n_train + n_val].tolist()
    chosen = {"train800": [(train, i) for i in picked[:n_train]], "val200": [(train, i) for i in picked[n_train:]],
              "test": [(test, i) for i in torch.randperm(len(test), generator=g)[:n_test].tolist()]}
    lines = {}
    for split, items in chosen.items():
        lines[split] = []
        for n, (ds, i) in enumerate(items):
            name = f"images/{split}_{n:05d}.png"
            img = ds.images[i].numpy()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / name)
            lines[split].append(f"{name} {int(ds.labels[i])}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder
