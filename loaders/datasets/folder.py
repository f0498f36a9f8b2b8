"""Your own images: a folder of class sub-folders, or a CSV/TSV list, decoded once into a cache on disk.

    <folder>/<class>/.../<image>                       flat: one pool, split into train/val/test by the caller
    <folder>/{train,test}/<class>/.../<image>           the test split given
    <list>.csv  or  <list>.tsv                           lines "relative/path,label" (label: a class name or id)

Classes are the sub-folder names (or the CSV's labels), sorted; ids written as plain integers stay ids. A class
with no readable image (a folder holding only notes.txt or .heic files, or only files that fail to decode) is an
error naming it, unless ``drop_empty`` leaves it out. Image files at the folder's root, beside the class folders,
belong to no class: they are left out and reported (:attr:`Source.outside`), with one warning. Hidden files and
folders are skipped; files of other types, wherever they lie, are counted in one warning. Every decodable image goes
through :func:`loaders.datasets.cache.decode_cached` (parallel, cached, see there); a file that cannot be decoded
is skipped and reported with its reason (:attr:`Source.skipped`), never stops the run. The store policy is the
caller's choice: by default the shorter side is kept at 256 pixels (224 / 0.875, timm's evaluation crop).
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..images import IMAGE_EXTENSIONS, StorePolicy, is_image_name
from .base import DataNotFoundError, DatasetError, ImageDataset, check_split
from .cache import decode_cached
from .lists import inside, read_csv_list

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".csv", ".tsv")


OUTSIDE_REASON = "outside any class folder (a file at the folder's root has no class)"


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
    outside: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason): images in no class
    dropped: list[str] = field(default_factory=list)  # classes without a readable image, left out (drop_empty)


@dataclass
class Listing:
    """What a folder or list holds, before anything is decoded."""

    files: list[Path]
    labels: list[int]
    classes: list[str]
    groups: list[str]
    has_test: bool
    outside: list[Path] = field(default_factory=list)  # image files beside the class folders (in no class)
    ignored: collections.Counter = field(default_factory=collections.Counter)  # other files, by extension
    dropped: list[str] = field(default_factory=list)  # class folders without an image file (drop_empty)
    ids: bool = False  # a list labelled by class ids: every id up to the largest is a class, images or not


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _count_other(name: str, ignored: collections.Counter) -> None:
    ignored[Path(name).suffix.lower() or "(no extension)"] += 1


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
                _count_other(name, ignored)
    return sorted(found)


def warn_ignored(path: Path, ignored: collections.Counter) -> None:
    """The one warning about files that are not images (everywhere a folder is read: training and prediction)."""
    if ignored:
        log.warning("%s: ignored %d file(s) that are not images this Pillow reads (%s)", path, sum(ignored.values()),
                    ", ".join(f"{k}: {v}" for k, v in ignored.most_common()))


def _root_files(folder: Path, listing: Listing) -> None:
    """Files lying beside the class folders: images are listed as outside any class, others counted."""
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if is_image_name(p.name):
            listing.outside.append(p)
        else:
            _count_other(p.name, listing.ignored)


def _what_is_there(folder: Path) -> str:
    names = sorted(p.name for p in folder.rglob("*") if p.is_file())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"it holds only {shown}"


def list_folder(path: Path, drop_empty: bool = False) -> Listing:
    """Files, labels and classes of an image folder, without decoding anything. A class folder without an image
    file is an error naming it (``drop_empty``: it is left out, with a warning)."""
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
    listing = Listing([], [], [], [], has_test)
    found = {(g, c): walk_images(folder / c, listing.ignored) if (folder / c).is_dir() else []
             for g, folder in parts for c in classes}
    empty = [c for c in classes if not found[("train", c)]]
    if empty and not drop_empty:
        c = empty[0]
        raise DatasetError(f"class folder {parts[0][1] / c} has no image this Pillow reads "
                           f"({'/'.join(IMAGE_EXTENSIONS)}): {_what_is_there(parts[0][1] / c)}; a class without "
                           f"images cannot be learnt{f' ({len(empty)} such classes)' if len(empty) > 1 else ''}: "
                           "add images, remove the folder, or pass --drop-empty-classes to leave such classes out")
    if empty:
        log.warning("%s: left out %d class folder(s) without an image (--drop-empty-classes): %s", path, len(empty),
                    ", ".join(empty))
    listing.classes, listing.dropped = [c for c in classes if c not in empty], empty
    for group, folder in parts:
        for label, c in enumerate(listing.classes):
            listing.files += found[(group, c)]
            listing.labels += [label] * len(found[(group, c)])
            listing.groups += [group] * len(found[(group, c)])
    for folder in [path] + ([p for _, p in parts] if has_test else []):
        _root_files(folder, listing)
    warn_ignored(path, listing.ignored)
    if not listing.files:
        raise DataNotFoundError(f"{path}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in the class folders {classes}")
    return listing


def list_csv(path: Path) -> Listing:
    """Files, labels and classes of a CSV/TSV list; paths relative to the list's folder."""
    rows = read_csv_list(path)
    root = path.parent
    files = [inside(root, name, f"{path}:{n}") for name, _, n in rows]
    texts = [label for _, label, _ in rows]
    by_id = all(t.isascii() and t.isdigit() for t in texts)
    if by_id:  # class ids
        ids = [int(t) for t in texts]
        classes = [str(i) for i in range(max(ids) + 1)]
        labels = ids
    else:
        classes = sorted(set(texts))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[t] for t in texts]
    return Listing(files, labels, classes, ["train"] * len(files), False, ids=by_id)


def open_source(path: str | Path, policy: StorePolicy | None = None, workers: int | None = None,
                progress: bool = True, check=None, drop_empty: bool = False) -> Source:
    """List and decode (once, cached) an image folder or a CSV/TSV list.

    ``check(classes)``: called with the class names before anything is decoded (e.g. to check a class
    selection). A class whose training images all fail to decode is an error naming it, as a class folder without
    any image file is; ``drop_empty`` leaves such classes out instead (with a warning)."""
    path = Path(path).expanduser()
    policy = policy or StorePolicy.for_photos(224)
    is_list = path.suffix.lower() in LIST_SUFFIXES and path.is_file()
    listing = list_csv(path) if is_list else list_folder(path, drop_empty)
    if check is not None:
        check(listing.classes)
    files, classes = listing.files, listing.classes
    root = path.parent if is_list else path
    store, report = decode_cached(files, root, path.name, policy, workers, progress)
    rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    labels, group = np.array(listing.labels, np.int64), np.array(listing.groups)
    counts = {g: report.counts(np.flatnonzero(group == g)) for g in dict.fromkeys(listing.groups)}
    skipped = [(rel[i], report.reasons.get(i, "not decoded")) for i in np.flatnonzero(~report.ok)]
    readable = np.bincount(labels[report.ok & (group == "train")], minlength=len(classes))
    unreadable = [] if listing.ids else [c for c, n in zip(classes, readable) if n == 0]
    if unreadable and not drop_empty:
        ci = classes.index(unreadable[0])
        bad = np.flatnonzero(~report.ok & (labels == ci) & (group == "train"))
        why = f"e.g. {rel[bad[0]]}: {report.reasons.get(int(bad[0]), 'not decoded')}" if len(bad) else "none listed"
        raise DatasetError(f"class {unreadable[0]!r} of {path} has no image that decodes ({why}); a class "
                           "without images cannot be learnt: add images, remove it, or pass --drop-empty-classes "
                           "to leave such classes out")
    keep_class = (readable > 0) | listing.ids
    if unreadable:
        log.warning("%s: left out %d class(es) without a decodable image (--drop-empty-classes): %s", path,
                    len(unreadable), ", ".join(unreadable))
    new_label = np.cumsum(keep_class) - 1
    ok = np.flatnonzero(report.ok & keep_class[labels])
    dataset = ImageDataset(store.subset(ok), torch.from_numpy(new_label[labels[ok]]),
                           [c for c, k in zip(classes, keep_class) if k], path.stem if is_list else path.name)
    outside = [(os.path.relpath(f, root).replace(os.sep, "/"), OUTSIDE_REASON) for f in listing.outside]
    if outside:
        log.warning("%s: %d image(s) lie beside the class folders, outside any class: left out (listed in the run's "
                    "skipped.txt)", path, len(outside))
    dropped = listing.dropped + unreadable
    return Source(dataset, [rel[i] for i in ok], group[ok], skipped, counts, listing.has_test, report.decoded[ok],
                  outside, dropped)


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
