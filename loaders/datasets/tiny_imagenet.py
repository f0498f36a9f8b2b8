"""Tiny-ImageNet-200 (200 classes, 64x64): from the zip (read in place) or an extracted folder, cached as .npz.

The "test" split is the official validation set, because the labels of Tiny-ImageNet's own test set were never
published.
"""

from __future__ import annotations

import collections
import logging
import stat
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write
from ..images import decode_image
from .archives import check_member_name, fetch, verify_file
from .base import DATA_ENV, DataNotFoundError, DatasetError, ImageDataset, check_split, data_root

logger = logging.getLogger(__name__)

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FILE = "tiny-imagenet-200.zip"
# md5 of the zip as published by cs231n (the value other dataset libraries check against)
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_CACHE_VERSION = 1


class _FolderSource:
    """Read files of an extracted tiny-imagenet-200 folder by relative path."""

    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def close(self):
        pass


class _ZipSource:
    """Read files of tiny-imagenet-200.zip directly (no extraction), after checking every member."""

    def __init__(self, archive: Path, folder: str):
        self.archive = archive
        try:
            self.zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{archive}: corrupt zip archive ({e}); delete it and download it again") from e
        self.prefix = folder + "/"
        self.members = {}
        for info in self.zf.infolist():
            path = check_member_name(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{archive}: refusing member {info.filename!r}: symlinks are not allowed")
            if not info.is_dir() and str(path).startswith(self.prefix):
                self.members[str(path)[len(self.prefix):]] = info

    def names(self) -> list[str]:
        return sorted(self.members)

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(self.members[name])
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC errors are BadZipFile
            raise DatasetError(f"{self.archive}: corrupt member {name} ({e})") from e

    def close(self):
        self.zf.close()



def _tiny_imagenet_classes(source, names: set[str], wnids: list[str]) -> list[str]:
    """Readable names from words.txt (first synonym), falling back to the wnid; duplicates get the wnid added."""
    words = {}
    if "words.txt" in names:
        for line in source.read("words.txt").decode("utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    names = [words.get(w) or w for w in wnids]
    counts = collections.Counter(names)
    return [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(names, wnids)]


def _build_tiny_imagenet(source, split: str, where: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    names = set(source.names())
    if "wnids.txt" not in names:
        raise DatasetError(f"{where}: no wnids.txt, not a tiny-imagenet-200 folder")
    wnids = sorted(w.strip() for w in source.read("wnids.txt").decode("utf-8").split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[str, int]] = []
    if split == "train":
        for name in sorted(names):
            parts = name.split("/")
            if (len(parts) == 4 and parts[0] == "train" and parts[2] == "images"
                    and parts[3].lower().endswith(".jpeg")):
                if parts[1] not in index:
                    raise DatasetError(f"{where}: {name} is in class {parts[1]!r}, which wnids.txt does not list")
                items.append((name, index[parts[1]]))
    else:
        if "val/val_annotations.txt" not in names:
            raise DatasetError(f"{where}: no val/val_annotations.txt")
        for n, line in enumerate(source.read("val/val_annotations.txt").decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DatasetError(f"{where}: val/val_annotations.txt line {n} is malformed or names an unknown "
                                   f"class: {line!r}")
            items.append((f"val/images/{fields[0]}", index[fields[1]]))
        items.sort()
    if not items:
        raise DatasetError(f"{where}: no {split} images found")
    images = np.empty((len(items), 64, 64, 3), np.uint8)
    for i, (name, _) in enumerate(tqdm(items, desc=f"decoding tiny_imagenet {split}", unit="img")):
        if name not in names:
            raise DatasetError(f"{where}: {name} is listed but missing")
        arr = decode_image(source.read(name), f"{where}:{name}", "RGB")
        if arr.shape != (64, 64, 3):
            raise DatasetError(f"{where}:{name}: expected a 64x64 image, got {arr.shape[1]}x{arr.shape[0]}")
        images[i] = arr
    labels = np.array([label for _, label in items], np.int64)
    return images, labels, _tiny_imagenet_classes(source, names, wnids), wnids


def load_tiny_imagenet(root: str | Path | None = None, split: str = "train", download: bool = True,
                       md5: str | None = None) -> ImageDataset:
    """Tiny-ImageNet-200 as (N, 64, 64, 3) uint8: train 100,000 images, "test" = the 10,000 validation images.

    Tiny-ImageNet's own test labels were never published, so the labelled validation set serves as the test split;
    hold out part of train (split_train_val) for model selection. Sources, in order: the cache
    <root>/tiny-imagenet-200-<split>.npz, an extracted <root>/tiny-imagenet-200/, the zip <root>/tiny-imagenet-200.zip
    (read in place, md5 checked, every member name checked), a download. The first run decodes the JPEGs with PIL
    (greyscale ones converted to RGB) and writes the cache (allow_pickle=False); delete it to rebuild.
    """
    check_split(split)
    root = data_root(root)
    cache = root / f"{TINY_IMAGENET_FOLDER}-{split}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if int(z["version"]) == TINY_IMAGENET_CACHE_VERSION:
                    return ImageDataset(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                        [str(c) for c in z["classes"]], f"tiny_imagenet-{split}")
            logger.info("%s: outdated cache, rebuilding", cache)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            logger.warning("%s: unreadable cache (%s), rebuilding", cache, e)

    folder, archive = root / TINY_IMAGENET_FOLDER, root / TINY_IMAGENET_FILE
    if (folder / "wnids.txt").is_file():
        source, where = _FolderSource(folder), str(folder)
    else:
        if not archive.is_file():
            if not download:
                raise DataNotFoundError(f"tiny_imagenet: neither {folder} nor {archive} exists. Download "
                                        f"{TINY_IMAGENET_URL} into {root} (or set ${DATA_ENV}), or allow "
                                        f"download=True.")
            fetch(TINY_IMAGENET_URL, archive, md5=md5 or TINY_IMAGENET_MD5, desc=TINY_IMAGENET_FILE)
        verify_file(archive, "md5", md5 or TINY_IMAGENET_MD5)
        source, where = _ZipSource(archive, TINY_IMAGENET_FOLDER), str(archive)
    try:
        images, labels, classes, wnids = _build_tiny_imagenet(source, split, where)
    finally:
        source.close()

    try:  # a unique temporary name per writer: several ranks may build the cache at once
        with atomic_write(cache) as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes), wnids=np.array(wnids),
                     version=np.array(TINY_IMAGENET_CACHE_VERSION))
        logger.info("cached decoded tiny_imagenet %s split at %s", split, cache)
    except OSError as e:
        logger.warning("could not write cache %s (%s); the next run decodes again", cache, e)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, f"tiny_imagenet-{split}")

