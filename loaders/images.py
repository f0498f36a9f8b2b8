"""Reading image files and bytes into uint8 arrays, with errors that name the file (PIL, via matplotlib).

Every place that turns an image file into pixels goes through here: image-folder datasets, Tiny-ImageNet's
JPEGs, ``tools/predict.py`` and the attention-map tool. Normalising for the model is
:class:`loaders.transforms.BatchTransform`'s job.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image  # Pillow comes with matplotlib

from .errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def open_image(path):
    """A fully loaded PIL image (palette images converted to RGBA); DatasetError naming the file otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode not in ("P", "PA") else im.convert("RGBA")
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist") from None
    except Exception as e:
        raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def decode_image(data: bytes, source: str, mode: str = "RGB") -> np.ndarray:
    """Image bytes → uint8 array (H, W, C) in PIL ``mode`` (e.g. "RGB"; "L" gives (H, W))."""
    try:
        return np.asarray(open_image(io.BytesIO(data)).convert(mode))
    except DatasetError as e:  # name the archive member, not the in-memory buffer
        raise DatasetError(f"{source}: {str(e).split(': ', 1)[-1]}") from e.__cause__


def read_image(path, mode: str = "RGB", size: int | None = None) -> np.ndarray:
    """An image file as uint8 (H, W, 3) (``mode`` "RGB"), resized to size×size with PIL bilinear if given."""
    im = open_image(path).convert(mode)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im)


def read_images(paths, size: int | None = None) -> torch.Tensor:
    """Image files as one uint8 batch (B, H, W, 3); ``size`` resizes each to size×size (needed for mixed sizes)."""
    arrays = [read_image(p, "RGB", size) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DatasetError(f"images of different sizes {sorted(shapes)} cannot form one batch; pass size=...")
    return torch.from_numpy(np.stack(arrays).copy())
