"""Image folders: <folder>/<class>/<image>, or <folder>/{train,test}/<class>/<image>."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..images import IMAGE_EXTENSIONS, open_image
from .base import DataNotFoundError, DatasetError, ImageDataset, check_split

logger = logging.getLogger(__name__)

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(path: str | Path, split: str = "train", name: str | None = None) -> ImageDataset:
    """Images from <path>/<class>/<file> (png, jpg, jpeg, bmp; searched recursively inside each class folder).

    If <path>/train and <path>/test both exist, the requested split is read from there (classes taken from train);
    otherwise <path> is the train split and asking for "test" is an error (hold out data with split_train_val).
    Classes are the sub-folder names, sorted. Channels: if every image is greyscale, C = 1; otherwise every image is
    converted to RGB (C = 3; alpha dropped). Sizes: images of a size other than the most common one are resized to
    it with PIL bilinear filtering (aspect ratio not kept), with a warning saying how many.
    """
    check_split(split)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"image folder {path} does not exist")
    if (path / "train").is_dir() and (path / "test").is_dir():
        classes = [d.name for d in _class_dirs(path / "train")]
        folder = path / split
        extra = sorted({d.name for d in _class_dirs(folder)} - set(classes))
        if extra:
            raise DatasetError(f"{folder}: class folder(s) {extra} do not exist in {path / 'train'}")
    elif split == "test":
        raise DataNotFoundError(f"{path} has no train/ and test/ sub-folders, so it has no test split; use "
                                f"split_train_val on the train split, or create {path}/train and {path}/test")
    else:
        folder = path
        classes = [d.name for d in _class_dirs(folder)]
    if not classes:
        raise DataNotFoundError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>.png)")

    files = [(f, label) for label, c in enumerate(classes) if (folder / c).is_dir()
             for f in _image_files(folder / c)]
    if not files:
        raise DataNotFoundError(f"{folder}: no images with extension {'/'.join(IMAGE_EXTENSIONS)} in the class "
                                f"folders {classes}")
    pil = [open_image(f) for f, _ in tqdm(files, desc=f"reading {folder.name}", unit="img",
                                           disable=len(files) < 1000)]
    grey = all(im.mode in _GREY_MODES for im in pil)
    mode = "L" if grey else "RGB"
    sizes = collections.Counter(im.size for im in pil)
    target = max(sizes, key=lambda s: (sizes[s], s[0] * s[1], s))  # most common; ties: the larger
    if len(sizes) > 1:
        logger.warning("%s: %d of %d images are not %dx%d; resized (bilinear)", folder,
                       len(pil) - sizes[target], len(pil), *target)
    images = np.empty((len(pil), target[1], target[0], 1 if grey else 3), np.uint8)
    for i, im in enumerate(pil):
        im = im.convert(mode)
        if im.size != target:
            im = im.resize(target, Image.BILINEAR)
        images[i] = np.asarray(im).reshape(images.shape[1:])
    labels = np.array([label for _, label in files], np.int64)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes,
                        name or f"{path.name}-{split}")

