"""Folders of photo-like images for the data benchmark and the tests: large JPEGs and every awkward case.

The pictures are smooth (a class-coloured gradient with a few discs and mild noise), so they compress like photos
(a 12-megapixel JPEG is a few MB, not the 20 MB of pure noise) and a model can tell the classes apart.
:func:`write_photo_folder` adds, on request, one file of each kind people's folders contain: CMYK, greyscale,
16-bit greyscale PNG, an EXIF-rotated portrait, RGBA PNG, WebP, TIFF, a palette GIF, a truncated JPEG, a
hidden file and a text file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(200, 60, 40), (40, 160, 70), (50, 80, 200), (220, 200, 60), (150, 60, 180), (60, 190, 200)]


def photo(width: int, height: int, label: int, seed: int) -> Image.Image:
    """A smooth RGB picture whose dominant colour is the class's."""
    rng = np.random.default_rng(seed)
    h, w = max(8, height // 8), max(8, width // 8)  # drawn small, then scaled up: smooth like a photo
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(PALETTE[label % len(PALETTE)], np.float32)
    img = base * (0.6 + 0.4 * (x / w))[..., None] * (0.7 + 0.3 * (y / h))[..., None]
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * min(h, w)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return small.resize((width, height), Image.Resampling.BILINEAR)


def write_photo_folder(root, classes: int = 3, per_class: int = 10, size: tuple[int, int] = (4032, 3024),
                       small: tuple[int, int] = (500, 375), awkward: bool = True, seed: int = 0,
                       quality: int = 90) -> dict[str, Path]:
    """<root>/class_<k>/img_<i>.jpg, alternating large (``size``) and small JPEGs; with ``awkward``, one file of
    each difficult kind in class_0. Returns the awkward files by kind."""
    root = Path(root)
    made: dict[str, Path] = {}
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size if i % 2 == 0 else small
            photo(w, h, c, seed * 100003 + c * 1009 + i).save(folder / f"img_{i:04d}.jpg", quality=quality)
    if not awkward:
        return made
    f = root / "class_0"
    pic = lambda w, h, k: photo(w, h, 0, seed + 7919 * k)  # noqa: E731
    made["cmyk"] = f / "cmyk.jpg"
    pic(800, 600, 1).convert("CMYK").save(made["cmyk"], quality=quality)
    made["grey"] = f / "grey.jpg"
    pic(640, 480, 2).convert("L").save(made["grey"], quality=quality)
    made["grey16"] = f / "grey16.png"
    ramp = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    Image.fromarray(ramp).save(made["grey16"])
    made["exif_rotated"] = f / "portrait.JPG"
    im = pic(1200, 900, 3)  # stored landscape, shown portrait: EXIF orientation 6 (rotate 90° clockwise)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(made["exif_rotated"], exif=exif, quality=quality)
    made["rgba"] = f / "alpha.png"
    rgba = pic(240, 180, 4).convert("RGBA")  # smaller than any stored size: kept pixel for pixel
    rgba.putalpha(128)
    rgba.save(made["rgba"])
    made["webp"] = f / "photo.webp"
    pic(640, 480, 5).save(made["webp"])
    made["tiff"] = f / "scan.TIF"
    pic(640, 480, 6).save(made["tiff"])
    made["gif"] = f / "anim.gif"
    pic(200, 150, 7).convert("P").save(made["gif"])
    made["truncated"] = f / "truncated.jpg"
    data = (root / "class_0" / "img_0000.jpg").read_bytes()
    made["truncated"].write_bytes(data[: len(data) // 3])
    (f / ".DS_Store").write_bytes(b"\0" * 64)
    (f / ".hidden.jpg").write_bytes(data)
    (f / "notes.txt").write_text("not an image\n")
    return made
