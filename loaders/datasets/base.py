"""The shared container of every dataset: one split fully in memory as uint8 images and int64 labels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .store import PixelStore
from ..errors import DataNotFoundError, DatasetError  # noqa: F401  (re-exported)

DATA_ENV = "VIT_PEFT_DATA"
SPLITS = ("train", "test")


def default_data_root() -> Path:
    """$VIT_PEFT_DATA if set, else ~/.cache/vit-peft/data."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vit-peft" / "data"


@dataclass
class ImageDataset:
    """One split of an image classification dataset: small sets fully in memory (a uint8 tensor), image folders
    and benchmark lists as a memory-mapped :class:`~loaders.datasets.store.PixelStore` of images of any size."""

    images: torch.Tensor | PixelStore  # (N, H, W, C) uint8, C in {1, 3}; or a PixelStore of N images
    labels: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: list[str]
    name: str = "dataset"
    load_counts: dict | None = None  # {"decoded": n, "from_cache": n, "skipped": n} when read through the cache

    def __post_init__(self):
        im, lab = self.images, self.labels
        if isinstance(im, PixelStore):
            pass
        elif not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.ndim != 4 or im.shape[-1] not in (1, 3):
            raise DatasetError(f"{self.name}: images must be a uint8 tensor (N, H, W, C) with C in {{1, 3}}, got "
                               f"{getattr(im, 'dtype', type(im))} {tuple(getattr(im, 'shape', ()))}")
        if not isinstance(lab, torch.Tensor) or lab.dtype != torch.int64 or lab.ndim != 1 or len(lab) != len(im):
            raise DatasetError(f"{self.name}: labels must be an int64 tensor ({len(im)},), got "
                               f"{getattr(lab, 'dtype', type(lab))} {tuple(getattr(lab, 'shape', ()))}")
        self.classes = [str(c) for c in self.classes]
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= len(self.classes)):
            raise DatasetError(f"{self.name}: labels span [{int(lab.min())}, {int(lab.max())}] but there are "
                               f"{len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, images={tuple(self.images.shape)}, "
                f"num_classes={self.num_classes}{', on disk' if self.on_disk else ''})")

    @property
    def on_disk(self) -> bool:
        """True when the images are a memory-mapped store (streamed in batches), False for an in-memory tensor."""
        return isinstance(self.images, PixelStore)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W); for a store of mixed sizes the largest of each."""
        return tuple(self.images.shape[1:3])

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def class_counts(self) -> torch.Tensor:
        """Number of images per class, (num_classes,) int64."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)

    def subset(self, indices: torch.Tensor | Sequence[int], name: str | None = None) -> "ImageDataset":
        """The images at `indices` (same classes and labels)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).cpu()
        images = (self.images.subset(idx.numpy()) if self.on_disk else self.images[idx.to(self.images.device)])
        return ImageDataset(images, self.labels[idx.to(self.labels.device)], list(self.classes), name or self.name)



def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def data_root(root) -> Path:
    """``root`` as a Path (``~`` expanded), or the default data root when it is None."""
    return Path(root).expanduser() if root is not None else default_data_root()
