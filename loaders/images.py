"""Reading image files and bytes into uint8 arrays, with errors that name the file (PIL, via matplotlib).

Every place that turns an image file into pixels goes through here: the decode cache of image folders, CSV lists,
VTAB-1k and FGVC (:func:`decode_for_store`), Tiny-ImageNet's JPEGs, ``tools/predict.py`` and the attention-map
tool. Normalising for the model is :class:`loaders.transforms.BatchTransform`'s job.

What a decoded photo is, whatever its file (:func:`to_uint8`):

* EXIF orientation is applied (a portrait phone photo stays upright);
* greyscale (1-bit, 8-bit, 16-bit, float) stays one channel; 16-bit values are scaled to 8 bits
  (round(v · 255 / 65535)), never clipped; everything else becomes RGB (CMYK, YCbCr, palette, LAB, HSV);
* transparency (RGBA, LA, palette with a transparent colour) is composited on white, as a browser shows it;
* animated files (GIF, WebP, APNG) give their first frame;
* Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is kept: a larger file is refused by name.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError

# The formats photos and dataset exports come in, as far as this Pillow reads them; matched case-insensitively.
_PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".tif", ".tiff", ".bmp", ".dib",
                     ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi")
Image.init()
IMAGE_EXTENSIONS = tuple(e for e in _PHOTO_EXTENSIONS if Image.registered_extensions().get(e) in Image.OPEN)
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_image_name(name: str) -> bool:
    """A file name this project reads as an image: a known extension (any case), not hidden."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _white_background(im: Image.Image) -> Image.Image:
    """Composite an image with alpha on white ("L" for grey+alpha, else "RGB")."""
    grey = im.mode in ("LA", "La")
    rgba = im.convert("LA" if grey else "RGBA")
    out = Image.new("L" if grey else "RGB", im.size, 255 if grey else (255, 255, 255))
    out.paste(rgba.convert("L" if grey else "RGB"), mask=rgba.getchannel("A"))
    return out


def to_uint8(im: Image.Image) -> np.ndarray:
    """A loaded PIL image as uint8 (H, W, C), C = 1 for greyscale and 3 otherwise (see the module docstring)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "LA", "La"):
        im = _white_background(im)
    if im.mode.startswith("I"):  # 16-bit greyscale (I;16*, or "I" holding 16-bit PNG values): scale, not clip
        a = np.asarray(im).astype(np.int64)
        return ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)[..., None]
    if im.mode == "F":
        return np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)[..., None]
    if im.mode in _GREY_MODES:
        return np.asarray(im.convert("L"))[..., None]
    return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class StorePolicy:
    """How an image is stored in a decode cache: everything besides the file that determines the pixels.

    ``shorter``: the shorter side is reduced to ``size`` (never enlarged; antialiased bilinear), the aspect ratio kept; sides longer
    than ``max_aspect`` × the shorter one are centre-cropped to that (panoramas). JPEGs are decoded at a reduced
    scale first where that still leaves ≥ ``size`` pixels (libjpeg's DCT scaling, Pillow's ``draft``).
    ``square``: resized to size × size (what VTAB-1k's official pipeline trains on), no EXIF, no draft, alpha
    dropped as ``convert("RGB")`` does, with PIL's ``resample`` filter: the official pixels (VTAB-1k: bicubic,
    ``Resize((224, 224), interpolation=3)``; the official RLRR FGVC pipeline: bilinear to 256 × 256).
    """

    kind: str = "shorter"  # shorter | square
    size: int = 256
    max_aspect: float = 4.0
    resample: str = "bicubic"  # square: bicubic | bilinear (PIL's antialiased filters)

    @classmethod
    def for_photos(cls, image_size: int, crop_pct: float = 0.875, size: int | None = None) -> "StorePolicy":
        """Photos for training at ``image_size``: the shorter side kept at image_size / crop_pct (the evaluation
        resize; 256 for 224), unless ``size`` says otherwise."""
        return cls("shorter", size or round(image_size / crop_pct))

    def settings(self) -> dict:
        """Everything that changes stored pixels, for the cache key (the Pillow version included)."""
        return {"kind": self.kind, "size": self.size, "max_aspect": self.max_aspect,
                "resample": self.resample if self.kind == "square" else "bilinear",
                "alpha": "white", "sixteen_bit": "scaled", "exif": self.kind == "shorter",
                "draft": self.kind == "shorter", "pillow": Image.__version__}


def _reduce(im: Image.Image, policy: StorePolicy) -> Image.Image:
    w, h = im.size
    s = policy.size
    if policy.kind == "square":
        if policy.resample not in ("bicubic", "bilinear"):
            raise ValueError(f"StorePolicy.resample must be bicubic or bilinear, got {policy.resample!r}")
        return im if (w, h) == (s, s) else im.resize((s, s), getattr(Image.Resampling, policy.resample.upper()))
    short = min(w, h)
    limit = int(policy.max_aspect * short)
    if max(w, h) > limit:  # centre-crop the long side of a panorama
        left, top = (w - min(w, limit)) // 2, (h - min(h, limit)) // 2
        im = im.crop((left, top, left + min(w, limit), top + min(h, limit)))
        w, h = im.size
    if short <= s:
        return im
    nw, nh = (s, max(s, round(h * s / w))) if w <= h else (max(s, round(w * s / h)), s)
    # Pillow's bilinear is antialiased (a triangle filter as wide as the reduction): 1.4x faster than bicubic,
    # and the training crop resamples the stored image again anyway
    return im.resize((nw, nh), Image.Resampling.BILINEAR)


def decode_for_store(path, policy: StorePolicy) -> np.ndarray:
    """One image file as stored by a decode cache: uint8 (H, W, C). Raises with the reason on any failure."""
    with Image.open(path) as im:
        if policy.kind == "square":
            im.load()
            return np.asarray(_reduce(im.convert("RGB"), policy))
        if im.format == "JPEG":
            im.draft(None, (policy.size, policy.size))  # scale 1/2, 1/4 or 1/8 while both sides stay >= size
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode not in ("RGB", "L"):
            im = to_pil(to_uint8(im))
        return _as_hwc(np.asarray(_reduce(im, policy)))


def _as_hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) as a PIL image: "L" for C = 1, "RGB" for C = 3."""
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def open_image(path):
    """A fully loaded PIL image, EXIF orientation applied (palette images converted to RGBA); DatasetError
    naming the file otherwise."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
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
    """An image file as uint8 (H, W, 3) (``mode`` "RGB", alpha on white, 16-bit scaled), resized to size×size
    with PIL bilinear if given."""
    arr = to_uint8(open_image(path))
    im = to_pil(arr).convert(mode)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im)


def resize_array(arr: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (H, W, C) resized to size × size with PIL bilinear (C = 1 kept), or as is when size is None."""
    if size is None or arr.shape[:2] == (size, size):
        return arr
    im = to_pil(arr)
    return _as_hwc(np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)))


def read_images(paths, size: int | None = None) -> torch.Tensor:
    """Image files as one uint8 batch (B, H, W, 3); ``size`` resizes each to size×size (needed for mixed sizes)."""
    arrays = [read_image(p, "RGB", size) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DatasetError(f"images of different sizes {sorted(shapes)} cannot form one batch; pass size=...")
    return torch.from_numpy(np.stack(arrays).copy())
