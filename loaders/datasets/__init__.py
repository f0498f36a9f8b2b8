"""Image datasets without torchvision: small ones in memory, everything else decoded once into a cache on disk.

Every loader returns an :class:`ImageDataset`: the images of one split, int64 labels (N,), the class names and a
name. Small vision benchmarks fit in memory (CIFAR-10 train is 150 MB) as a uint8 tensor (N, H, W, C); image
folders, CSV lists, VTAB-1k and FGVC are decoded once, in parallel, into a memory-mapped
:class:`~loaders.datasets.store.PixelStore` (``cache``, ``store``) that batches are read from. Augmentation runs
on the training device (:class:`loaders.transforms.BatchTransform`).

One module per source (``cifar``, ``fashion_mnist``, ``tiny_imagenet``, ``folder``, ``vtab``, ``fgvc``); ``base``
holds the container, ``lists`` the untrusting readers of list files,
``archives`` the checksum/download/member checks every archive goes through, ``selection`` class subsets and
splits, ``batches`` the project's one sharding scheme, ``stream`` batches delivered to the device.
:func:`load_dataset` picks the source by name.
The default data root is $VIT_PEFT_DATA, else ~/.cache/vit-peft/data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import DATA_ENV, SPLITS, DataNotFoundError, DatasetError, ImageDataset, check_split, default_data_root
from .batches import shard_bounds
from .cifar import CIFAR_ARCHIVES, RestrictedUnpickler, load_cifar, restricted_unpickle
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_fashion_mnist, parse_idx, read_idx
from .cache import CACHE_ENV, CacheReport, decode_cached
from .folder import LIST_SUFFIXES, Source, load_image_folder, open_source
from .store import PixelStore, gather_batch
from .selection import parse_class_spec, random_subset, select_classes, split_indices, split_train_val
from .tiny_imagenet import load_tiny_imagenet

_ALIASES = {"cifar10": "cifar10", "cifar100": "cifar100", "fashionmnist": "fashion_mnist",
            "tinyimagenet": "tiny_imagenet", "tinyimagenet200": "tiny_imagenet", "synthetic": "synthetic"}
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet", "synthetic")
SYNTHETIC_SIZES = {"train": 2048, "test": 512}  # 32 × 32 RGB, 10 classes


def load_synthetic(split: str = "train") -> ImageDataset:
    """Random 32 × 32 RGB images with random labels from 10 classes (seeded per split): for timing the training
    loop without any file, as timm's ``--dataset synthetic``. Nothing can be learnt from it."""
    g = torch.Generator().manual_seed(SPLITS.index(split) + 1)
    n = SYNTHETIC_SIZES[split]
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageDataset(images, labels, [str(c) for c in range(10)], f"synthetic-{split}")


def is_named_dataset(name: str) -> bool:
    """One of :data:`DATASETS` (by any of its spellings)."""
    return str(name).lower().replace("-", "").replace("_", "") in _ALIASES


def load_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 download: bool = True) -> ImageDataset:
    """Load one split of a dataset by name ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet"; "-" and
    "_" optional) or from an image folder path. `root` defaults to $VIT_PEFT_DATA or ~/.cache/vit-peft/data.
    With download=False a missing dataset raises DataNotFoundError saying where to put the files."""
    check_split(split)
    if not str(name).strip():
        raise DataNotFoundError("no dataset given (empty name): expected one of "
                                f"{', '.join(DATASETS)} or a folder path")
    key = _ALIASES.get(str(name).lower().replace("-", "").replace("_", ""))
    if key in CIFAR_ARCHIVES:
        return load_cifar(key, root, split, download)
    if key == "fashion_mnist":
        return load_fashion_mnist(root, split, download)
    if key == "tiny_imagenet":
        return load_tiny_imagenet(root, split, download)
    if key == "synthetic":
        return load_synthetic(split)
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() in LIST_SUFFIXES):
        return load_image_folder(name, split)
    raise DataNotFoundError(f"unknown dataset {name!r}: expected one of {DATASETS} an existing folder "
                            f"<folder>/<class>/<image>.jpg or a list.csv of 'path,label' lines")



__all__ = ["CACHE_ENV", "CacheReport", "LIST_SUFFIXES", "PixelStore", "Source", "decode_cached", "gather_batch",
           "open_source", "CIFAR_ARCHIVES", "DATASETS", "DATA_ENV", "DataNotFoundError", "DatasetError", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_FILES", "ImageDataset", "is_named_dataset", "RestrictedUnpickler", "SPLITS",
           "default_data_root", "load_cifar", "load_dataset", "load_fashion_mnist",
           "load_image_folder", "load_synthetic", "load_tiny_imagenet", "parse_class_spec", "parse_idx", "random_subset", "read_idx",
           "restricted_unpickle", "select_classes", "shard_bounds", "split_indices",
           "split_train_val"]
