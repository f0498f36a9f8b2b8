"""Fashion-MNIST from its four idx files, and a strict idx parser.

The files are looked for in /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), then in
<root>/fashion-mnist, else downloaded. The sha256 of the *decompressed* data is checked, so the original and
Debian's recompressed .gz files both pass.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .archives import fetch
from .base import DataNotFoundError, DatasetError, ImageDataset, check_split, data_root

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# sha256 of the decompressed files: valid for the original .gz and for Debian's recompressed copies.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Searched before <root>/fashion-mnist; where `apt-get install dataset-fashion-mnist` puts the files.
FASHION_MNIST_SYSTEM_DIRS = [Path("/usr/share/datasets/fashion-mnist")]

# idx type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


MAX_IDX_BYTES = 64 << 20  # the largest Fashion-MNIST file decompresses to 47,040,016 bytes


def _read_maybe_gzip(path: Path, limit: int = MAX_IDX_BYTES) -> bytes:
    """The file's bytes, gunzipped if it is gzip; a stream that would decompress past ``limit`` (a gzip bomb or
    not an idx file) or is corrupt is a DatasetError naming the file."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if raw[:2] != b"\x1f\x8b":
        if len(raw) > limit:
            raise DatasetError(f"{path}: larger than {limit:,} bytes, too large for a Fashion-MNIST idx file")
        return raw
    inflate = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        data = inflate.decompress(raw, limit + 1)
        if len(data) > limit or inflate.unconsumed_tail:
            raise DatasetError(f"{path}: decompresses to more than {limit:,} bytes; not a Fashion-MNIST idx file")
        if not inflate.eof:
            raise DatasetError(f"{path}: corrupt gzip data (the stream ends early: truncated file?)")
    except zlib.error as e:
        raise DatasetError(f"{path}: corrupt gzip data ({e})") from e
    return data


def parse_idx(data: bytes, source: str = "idx data", ndim: int | None = None) -> np.ndarray:
    """Parse an idx file's bytes strictly: magic (two zero bytes, type code, ndim), dims, exact size."""
    if len(data) < 4:
        raise DatasetError(f"{source}: {len(data)} bytes is too short for an idx header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{source}: bad idx magic {data[:4].hex()} (expected 0000 + type code + ndim)")
    dtype, n = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if ndim is not None and n != ndim:
        raise DatasetError(f"{source}: idx file has {n} dimension(s), expected {ndim}")
    header = 4 + 4 * n
    if len(data) < header:
        raise DatasetError(f"{source}: truncated idx header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=n, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize  # Python ints: no overflow however large the dims
    if len(data) != expected:
        raise DatasetError(f"{source}: idx size mismatch: dims {dims} need {expected} bytes, file has {len(data)} "
                           f"({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path, sha256: str | None = None, ndim: int | None = None) -> np.ndarray:
    """Read an idx file (.gz or plain); if `sha256` is given it must match the decompressed bytes."""
    data = _read_maybe_gzip(Path(path))
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DatasetError(f"{path}: sha256 of the decompressed data is {actual}, expected {sha256}; the file "
                               f"is corrupt or not the official one")
    return parse_idx(data, str(path), ndim)


def _find_fashion_mnist_file(stem: str, root: Path, download: bool) -> Path:
    folders = [*FASHION_MNIST_SYSTEM_DIRS, root / "fashion-mnist"]
    for folder in folders:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    if not download:
        raise DataNotFoundError(
            f"fashion_mnist: {stem}(.gz) not found in {', '.join(map(str, folders))}. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist), or put the four idx .gz files from {FASHION_MNIST_URL} in "
            f"{root / 'fashion-mnist'}, or allow download=True.")
    return fetch(FASHION_MNIST_URL + f"{stem}.gz", root / "fashion-mnist" / f"{stem}.gz", desc=f"{stem}.gz")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train", download: bool = True) -> ImageDataset:
    """Fashion-MNIST as (N, 28, 28, 1) uint8, 10 classes; sha256 of the decompressed files checked."""
    check_split(split)
    root = data_root(root)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path = _find_fashion_mnist_file(image_stem, root, download)
    label_path = _find_fashion_mnist_file(label_stem, root, download)
    images = read_idx(image_path, FASHION_MNIST_SHA256[image_stem], ndim=3)
    labels = read_idx(label_path, FASHION_MNIST_SHA256[label_stem], ndim=1)
    if len(images) != len(labels):
        raise DatasetError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    return ImageDataset(torch.from_numpy(images[..., None].copy()), torch.from_numpy(labels.astype(np.int64)),
                        list(FASHION_MNIST_CLASSES), f"fashion_mnist-{split}")

