"""Your own images: a folder of class sub-folders, or a CSV/TSV list, decoded once into a cache on disk.

    <folder>/<class>/.../<image>                       flat: one pool, split into train/val/test by the caller
    <folder>/{train,test}/<class>/.../<image>           the test split given
    <list>.csv  or  <list>.tsv                           lines "relative/path,label" (label: a class name or id)

Classes are the sub-folder names (or the CSV's labels), sorted; ids written as plain integers stay ids. Hidden
files and folders are skipped; files of other types are counted in one warning. Every decodable image goes
through :func:`loaders.datasets.cache.decode_cached` (parallel, cached, see there); a file that cannot be decoded
is skipped and reported with its reason (:attr:`Source.skipped`), never stops the run. The store policy is the
caller's choice: by default the shorter side is kept at 256 pixels (224 / 0.875, timm's evaluation crop).
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..images import IMAGE_EXTENSIONS, StorePolicy, is_image_name
from .base import DataNotFoundError, DatasetError, ImageDataset, check_split
from .cache import decode_cached
from .lists import inside, read_csv_list

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".csv", ".tsv")


@dataclass
class Source:
    """An image folder or list, decoded: every decodable file, in listing order, as one dataset."""

    dataset: ImageDataset  # the decodable images (a PixelStore), labels and classes
    paths: list[str]  # path of each item, relative to root
    group: np.ndarray  # (N,) str: "test" for the files of <folder>/test, else "train"
    skipped: list[tuple[str, str]]  # (relative path, reason) of every file that could not be decoded
    counts: dict[str, dict]  # per group: {"decoded": n, "from_cache": n, "skipped": n}
    has_test: bool  # the source brings its own test split (<folder>/test)
    decoded: np.ndarray  # (N,) bool: decoded by this call (False: read from the cache)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def walk_images(folder: Path, ignored: collections.Counter | None = None) -> list[Path]:
    """Image files under ``folder``, sorted, hidden files and folders skipped; other files counted in ignored."""
    found = []
    ignored = collections.Counter() if ignored is None else ignored
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            if is_image_name(name):
                found.append(Path(here) / name)
            else:
                ignored[Path(name).suffix.lower() or "(no extension)"] += 1
    return sorted(found)


def list_folder(path: Path) -> tuple[list[Path], list[int], list[str], list[str], bool]:
    """(files, labels, classes, groups, has_test) of an image folder, without decoding anything."""
    if not path.is_dir():
        raise DataNotFoundError(f"image folder {path} does not exist")
    has_test = (path / "train").is_dir() and (path / "test").is_dir()
    parts = [("train", path / "train"), ("test", path / "test")] if has_test else [("train", path)]
    classes = [d.name for d in _class_dirs(parts[0][1])]
    if not classes:
        raise DataNotFoundError(f"{parts[0][1]}: no class sub-folders (expected {parts[0][1]}/<class>/<image>.jpg)")
    if has_test:
        extra = sorted({d.name for d in _class_dirs(path / "test")} - set(classes))
        if extra:
            raise DatasetError(f"{path / 'test'}: class folder(s) {extra} do not exist in {path / 'train'}")
    files, labels, groups = [], [], []
    ignored: collections.Counter = collections.Counter()
    for group, folder in parts:
        for label, c in enumerate(classes):
            if (folder / c).is_dir():
                found = walk_images(folder / c, ignored)
                files += found
                labels += [label] * len(found)
                groups += [group] * len(found)
    if ignored:
        log.warning("%s: ignored %d file(s) that are not images this Pillow reads (%s)", path, sum(ignored.values()),
                    ", ".join(f"{k}: {v}" for k, v in ignored.most_common()))
    if not files:
        raise DataNotFoundError(f"{path}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in the class folders {classes}")
    return files, labels, classes, groups, has_test


def list_csv(path: Path) -> tuple[list[Path], list[int], list[str], list[str], bool]:
    """(files, labels, classes, groups, has_test) of a CSV/TSV list; paths relative to the list's folder."""
    rows = read_csv_list(path)
    root = path.parent
    files = [inside(root, name, f"{path}:{n}") for name, _, n in rows]
    texts = [label for _, label, _ in rows]
    if all(t.isascii() and t.isdigit() for t in texts):  # class ids
        ids = [int(t) for t in texts]
        classes = [str(i) for i in range(max(ids) + 1)]
        labels = ids
    else:
        classes = sorted(set(texts))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[t] for t in texts]
    return files, labels, classes, ["train"] * len(files), False


def open_source(path: str | Path, policy: StorePolicy | None = None, workers: int | None = None,
                progress: bool = True) -> Source:
    """List and decode (once, cached) an image folder or a CSV/TSV list."""
    path = Path(path).expanduser()
    policy = policy or StorePolicy.for_photos(224)
    is_list = path.suffix.lower() in LIST_SUFFIXES and path.is_file()
    files, labels, classes, groups, has_test = list_csv(path) if is_list else list_folder(path)
    root = path.parent if is_list else path
    store, report = decode_cached(files, root, path.name, policy, workers, progress)
    ok = np.flatnonzero(report.ok)
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    group = np.array(groups)
    counts = {g: report.counts(np.flatnonzero(group == g)) for g in dict.fromkeys(groups)}
    dataset = ImageDataset(store.subset(ok), torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(ok)], classes,
                           path.stem if is_list else path.name)
    skipped = [(rel[i], report.reasons.get(i, "not decoded")) for i in np.flatnonzero(~report.ok)]
    return Source(dataset, [rel[i] for i in ok], group[ok], skipped, counts, has_test, report.decoded[ok])


def load_image_folder(path: str | Path, split: str = "train", name: str | None = None,
                      policy: StorePolicy | None = None, workers: int | None = None,
                      progress: bool = True) -> ImageDataset:
    """One split of an image folder (or CSV list) as a disk-backed ImageDataset (see the module docstring).

    With <path>/train and <path>/test the split is read from there; a flat folder is all "train", and asking it
    for "test" is an error (hold out data with split_train_val, as tools/finetune.py does with --test-fraction).
    """
    check_split(split)
    src = open_source(path, policy, workers, progress)
    if split == "test" and not src.has_test:
        raise DataNotFoundError(f"{path} has no train/ and test/ sub-folders, so it has no test split; hold out "
                                f"part of it (tools/finetune.py does: --test-fraction), or create {path}/train and "
                                f"{path}/test")
    keep = torch.from_numpy(np.flatnonzero(src.group == split))
    ds = src.dataset.subset(keep, name or f"{Path(path).name}-{split}")
    return ds
