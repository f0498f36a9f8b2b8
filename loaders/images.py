"""Reading image files and bytes into uint8 arrays, with errors that name the file (PIL, via matplotlib).

Every place that turns an image file into pixels goes through here: the decode cache of image folders, CSV lists,
VTAB-1k and FGVC (:func:`decode_for_store`), Tiny-ImageNet's JPEGs, ``tools/predict.py`` and the attention-map
tool. Normalising for the model is :class:`loaders.transforms.BatchTransform`'s job.

One decoder, two steps. **Depth** (:func:`load_8bit`, the same for every caller): every sample becomes 8 bits;
16-bit samples, grey, grey + alpha, RGB and RGBA alike, become round(v · 255 / 65535) of their full 16-bit value
(Pillow alone keeps only the high byte of 16-bit colour, 511 -> 1 where the rule gives 2; grey it would clip).
**Colour**, what a decoded photo is (:func:`to_uint8`):

* EXIF orientation is applied (a portrait phone photo stays upright);
* greyscale (1-bit, 8-bit, 16-bit, float) stays one channel; everything else becomes RGB (CMYK, YCbCr, palette,
  LAB, HSV);
* transparency (RGBA, LA, palette with a transparent colour) is composited on white, as a browser shows it;
* animated files (GIF, WebP, APNG) give their first frame;
* Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is kept: a larger file is refused by name.

Benchmark lists (``StorePolicy.kind == "square"``) take the official pipelines' colour step instead,
``convert("RGB")`` of the 8-bit image (alpha dropped), after the same depth step.

A file that cannot become pixels raises :class:`ImageDecodeError` (a ``DatasetError``) naming the file and what
Pillow raised, whatever that was: ``OSError`` for a truncated, empty or unidentified file,
``Image.DecompressionBombError`` for a file over twice the pixel limit, ``ValueError``, ``SyntaxError``,
``EOFError`` or ``struct.error`` for malformed headers. It is the only exception a bad image raises here.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from .errors import DataNotFoundError, DatasetError

# The formats photos and dataset exports come in, as far as this Pillow reads them; matched case-insensitively.
_PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".tif", ".tiff", ".bmp", ".dib",
                     ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi")
Image.init()
IMAGE_EXTENSIONS = tuple(e for e in _PHOTO_EXTENSIONS if Image.registered_extensions().get(e) in Image.OPEN)
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageDecodeError(DatasetError):
    """A file that cannot become pixels; ``reason`` is what Pillow raised, as "TypeName: message"."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason})")
        self.path, self.reason = path, reason

    def __reduce__(self):  # crosses process boundaries (decode workers) intact
        return type(self), (self.path, self.reason)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).replace(chr(10), ' ') or type(e).__name__}"


def is_image_name(name: str) -> bool:
    """A file name this project reads as an image: a known extension (any case), not hidden."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def scale_16bit(a: np.ndarray) -> np.ndarray:
    """16-bit samples as uint8: round(v · 255 / 65535), values outside 0..65535 clipped first. Exact in integers:
    (v · 255 + 32767) // 65535 (v · 255 / 65535 is never a half: 2 · 255 · v is even, 65535 odd)."""
    return ((np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


# 16-bit colour in Pillow: the tile's unpacker keeps the high byte of each sample. The same unpacker with the
# other byte order keeps the low byte (the PNG filters still see 6 or 8 bytes per pixel; ";16N" is native order,
# TIFF's through libtiff), so a second decode of the file recovers every sample: v = 256 · high + low. Grey +
# alpha ("LA;16B", given as RGBA) is decoded again with the plain 4-byte unpacker: its R, G, B, A are the bytes
# L-high, L-low, A-high, A-low.
_OTHER_BYTE = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B", "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B",
               **{f"{m};16N": f"{m};16{'B' if sys.byteorder == 'little' else 'L'}" for m in ("RGB", "RGBA")}}
_GREY_ALPHA_16 = {"LA;16B": "RGBA"}


def _tile_rawmode(args) -> str | None:
    raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
    return raw if isinstance(raw, str) else None


def _rawmode(im: Image.Image) -> str | None:
    """The rawmode all tiles of an image share (read before loading), or None."""
    modes = {_tile_rawmode(t.args) for t in getattr(im, "tile", None) or []}
    return modes.pop() if len(modes) == 1 else None


def _decode_as(source, rawmode: str) -> np.ndarray:
    """The file decoded again with another unpacker (same decoder, same offsets)."""
    if hasattr(source, "seek"):
        source.seek(0)
    with Image.open(source) as im:
        im.tile = [t._replace(args=rawmode if isinstance(t.args, str) else (rawmode, *t.args[1:])) for t in im.tile]
        im.load()
        return np.asarray(im)


def _sixteen_bit_colour(im: Image.Image, source) -> Image.Image | None:
    """An 8-bit image of a 16-bit colour or grey + alpha file with every sample scaled from its full value; None
    for other files. ``im`` is the file opened and not yet loaded."""
    raw = _rawmode(im)
    if raw in _OTHER_BYTE:
        im.load()
        high = np.asarray(im).astype(np.int64)
        low = _decode_as(source, _OTHER_BYTE[raw]).astype(np.int64)
        return Image.fromarray(scale_16bit(high * 256 + low))  # (H, W, 3 or 4): "RGB" or "RGBA", as im
    if raw in _GREY_ALPHA_16:
        b = _decode_as(source, _GREY_ALPHA_16[raw]).astype(np.int64)  # (H, W, 4): L-high, L-low, A-high, A-low
        return Image.fromarray(scale_16bit(np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], -1)))
    return None


def to_8bit(im: Image.Image) -> Image.Image:
    """A loaded image whose samples are 8 bits: 16-bit and 32-bit integer greyscale scaled (:func:`scale_16bit`),
    float greyscale rounded and clipped to 0..255; 8-bit images as they are."""
    if im.mode.startswith("I"):  # I;16*, or "I" holding 16-bit values: scale, not clip
        return Image.fromarray(scale_16bit(np.asarray(im)))  # (H, W): "L"
    if im.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8))
    return im


_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that shows it upright


def load_8bit(im: Image.Image, source, exif: bool = True) -> Image.Image:
    """The depth step (module docstring): ``im`` (``Image.open(source)``, not loaded; drafted if wanted) loaded
    with 8-bit samples, EXIF orientation applied if ``exif``."""
    out = _sixteen_bit_colour(im, source)
    if out is None:
        im.load()
        out = to_8bit(im)
    method = _UPRIGHT.get(im.getexif().get(ExifTags.Base.Orientation, 1)) if exif else None
    return out.transpose(method) if method is not None else out


def _white_background(im: Image.Image) -> Image.Image:
    """Composite an image with alpha on white ("L" for grey+alpha, else "RGB")."""
    grey = im.mode in ("LA", "La")
    rgba = im.convert("LA" if grey else "RGBA")
    out = Image.new("L" if grey else "RGB", im.size, 255 if grey else (255, 255, 255))
    out.paste(rgba.convert("L" if grey else "RGB"), mask=rgba.getchannel("A"))
    return out


def to_uint8(im: Image.Image) -> np.ndarray:
    """A loaded PIL image as uint8 (H, W, C), C = 1 for greyscale and 3 otherwise (the colour step of the module
    docstring; 16-bit greyscale scaled, 16-bit colour only as far as ``im`` holds it: see :func:`load_8bit`)."""
    im = to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "LA", "La"):
        im = _white_background(im)
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
                "alpha": "white", "sixteen_bit": "scaled, grey and colour", "exif": self.kind == "shorter",
                "draft": self.kind == "shorter", "pillow": Image.__version__}


def _reduce(im: Image.Image, policy: StorePolicy) -> Image.Image:
    w, h = im.size
    s = policy.size
    if policy.kind == "square":
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
    """One image file as stored by a decode cache: uint8 (H, W, C). A file that cannot become pixels raises
    :class:`ImageDecodeError` (whatever Pillow raised); nothing else is caught."""
    if policy.kind == "square" and policy.resample not in ("bicubic", "bilinear"):
        raise ValueError(f"StorePolicy.resample must be bicubic or bilinear, got {policy.resample!r}")
    try:
        with Image.open(path) as im:
            if policy.kind == "square":  # the official pipelines: no EXIF, convert("RGB") (alpha dropped)
                return np.asarray(_reduce(load_8bit(im, path, exif=False).convert("RGB"), policy))
            if im.format == "JPEG":
                im.draft(None, (policy.size, policy.size))  # scale 1/2, 1/4 or 1/8 while both sides stay >= size
            im = load_8bit(im, path)
            if im.mode not in ("RGB", "L"):
                im = to_pil(to_uint8(im))
            return _as_hwc(np.asarray(_reduce(im, policy)))
    except Exception as e:  # Pillow's errors for bad files are many (module docstring): one type names them
        raise ImageDecodeError(path, _reason(e)) from e


def _as_hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) as a PIL image: "L" for C = 1, "RGB" for C = 3."""
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def open_image(path):
    """A fully loaded PIL image with 8-bit samples (:func:`load_8bit`), EXIF orientation applied, palette images
    converted to RGBA; :class:`ImageDecodeError` (or ``DataNotFoundError``) naming the file otherwise."""
    try:
        with Image.open(path) as im:
            out = load_8bit(im, path)
            return out.convert("RGBA") if out.mode in ("P", "PA") else out.copy() if out is im else out
    except FileNotFoundError:
        raise DataNotFoundError(f"image {path} does not exist") from None
    except Exception as e:
        raise ImageDecodeError(path, _reason(e)) from e


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
