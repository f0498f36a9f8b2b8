"""Decoded images on disk, read without holding them in memory: one flat uint8 file plus an index.

A :class:`PixelStore` is what a decode cache (``loaders.datasets.cache``) opens: ``pixels.u8`` holds every image's
(H, W, C) bytes back to back, the index says where each one starts and its shape. The file is memory-mapped, so
the pixels live in the operating system's page cache (shared by every process that reads them, dropped under
memory pressure), never in a process's anonymous memory: a run's own memory does not grow with the dataset.

:meth:`PixelStore.gather` turns a batch of indices into one padded uint8 canvas (B, Hmax, Wmax, C) and the true
(h, w) of each image; the device transform (``loaders.transforms``) crops and resizes each image from its own
region of the canvas. Stores whose images all have one size (VTAB-1k's 224 × 224) skip the padding.

A store opened from disk carries each image's CRC32 and never hands out bytes it has not checked: the first
access to an image (:meth:`PixelStore.image`, which ``gather`` uses) compares its bytes with their checksum, once
per process. An image that fails goes to the store's ``repair`` (the decode cache decodes its file again) or,
without one, raises :class:`~loaders.datasets.cache_index.CacheDamaged`.
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cache_index import CacheDamaged


class PixelStore:
    """Images of varying size in one memory-mapped uint8 file; ``subset`` views share the file."""

    def __init__(self, pixels: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, index: np.ndarray | None = None,
                 path: Path | None = None, crc: np.ndarray | None = None,
                 repair: Callable[[int], np.ndarray] | None = None):
        self.pixels = pixels  # (total_bytes,) uint8, usually a read-only np.memmap
        self.offsets = offsets  # (M,) int64: start of each stored image
        self.shapes = shapes  # (M, 3) int64: (h, w, c) of each stored image
        self.index = np.arange(len(offsets), dtype=np.int64) if index is None else index  # item -> stored image
        self.path = path
        # (M,) CRC32 of each stored image, checked on its first access (None: bytes that never left this process);
        # repair(j): image j decoded again, for one that fails (None: CacheDamaged). Subsets share all of it.
        self.crc, self.repair = crc, repair
        self.verified = None if crc is None else np.zeros(len(offsets), bool)
        self.replaced: dict[int, np.ndarray] = {}  # stored image -> its repaired pixels
        self._lock = threading.Lock()
        self._describe()

    def _describe(self) -> None:
        """channels: 1 if every item is greyscale, else 3; fixed: the (H, W) all items share, or None."""
        c = self.shapes[self.index, 2] if len(self.index) else np.array([3])
        self.channels = 1 if (c == 1).all() else 3
        hw = self.shapes[self.index, :2]
        self.fixed = tuple(int(v) for v in hw[0]) if len(hw) and (hw == hw[0]).all() and (c == c[0]).all() else None

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        size = "x".join(map(str, self.fixed)) if self.fixed else "mixed sizes"
        return f"PixelStore({len(self)} images, {size}, C={self.channels}, {self.path or 'in memory'})"

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, H, W, C) when every image has one size; (N, Hmax, Wmax, C) otherwise."""
        hw = self.fixed or tuple(int(v) for v in self.max_size())
        return (len(self), *hw, self.channels)

    def max_size(self) -> np.ndarray:
        return self.shapes[self.index, :2].max(0) if len(self) else np.zeros(2, np.int64)

    def subset(self, idx) -> "PixelStore":
        sub = PixelStore.__new__(PixelStore)
        sub.__dict__.update(self.__dict__)
        sub.index = self.index[np.asarray(idx, dtype=np.int64)]
        sub._describe()
        return sub

    def image(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 (h, w, c) (a view into the map), its checksum verified (module docstring)."""
        j = int(self.index[i])
        if self.verified is not None and not self.verified[j]:
            self._verify(j)
        if self.replaced and j in self.replaced:
            return self.replaced[j]
        return self._stored(j)

    def _stored(self, j: int) -> np.ndarray:
        h, w, c = (int(v) for v in self.shapes[j])
        start = int(self.offsets[j])
        return self.pixels[start:start + h * w * c].reshape(h, w, c)

    def _verify(self, j: int) -> None:
        if zlib.crc32(self._stored(j)) == int(self.crc[j]):
            self.verified[j] = True
            return
        with self._lock:  # one repair per image, whichever thread comes first
            if self.verified[j]:
                return
            if self.repair is None:
                raise CacheDamaged(f"{self.path}: stored image {j} does not match its checksum")
            arr = self.repair(j)
            if arr.shape != tuple(int(v) for v in self.shapes[j]) or arr.dtype != np.uint8:
                raise CacheDamaged(f"{self.path}: image {j} repaired to {arr.dtype} {arr.shape}, stored as "
                                   f"{tuple(int(v) for v in self.shapes[j])}")
            self.replaced[j] = arr
            self.verified[j] = True

    def gather(self, idx, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 canvas (B, Hmax, Wmax, C) of the items ``idx`` (zeros outside each image) and their (B, 2)
        sizes; sizes is None when every item fills the canvas. ``out``: a buffer of that shape (e.g. pinned)."""
        idx = np.asarray(idx, dtype=np.int64)
        hw = self.shapes[self.index[idx], :2]
        full = len(hw) == 0 or (hw == hw[0]).all()  # (a greyscale image fills all channels by broadcasting)
        canvas = out if out is not None else torch.empty(self.batch_shape(idx), dtype=torch.uint8)
        arr = canvas.numpy()
        if not full:
            arr.fill(0)
        for b, i in enumerate(idx):
            img = self.image(int(i))
            arr[b, :img.shape[0], :img.shape[1]] = img  # a greyscale image broadcasts into 3 channels
        return canvas, None if full else torch.from_numpy(hw.copy())

    def batch_shape(self, idx) -> tuple[int, int, int, int]:
        hw = self.shapes[self.index[np.asarray(idx, dtype=np.int64)], :2]
        H, W = (int(v) for v in (hw.max(0) if len(hw) else (0, 0)))
        return (len(hw), H, W, self.channels)

    def to_tensor(self) -> torch.Tensor:
        """Every item in memory as one uint8 tensor (N, H, W, C): only for stores of one image size."""
        if self.fixed is None and len(self):
            raise ValueError("images of different sizes cannot form one tensor; use gather() on batches")
        return self.gather(np.arange(len(self)))[0]


def gather_batch(images, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of ``images`` (an in-memory uint8 tensor or a :class:`PixelStore`) at ``idx``: (canvas, sizes)."""
    if isinstance(images, PixelStore):
        return images.gather(torch.as_tensor(idx).cpu().numpy())
    idx = torch.as_tensor(idx, dtype=torch.int64)
    return images[idx.to(images.device)], None
