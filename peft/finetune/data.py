"""The data of a run: train/val/test splits as uint8 tensors on the training device.

The validation split is held out from the training split (stratified, seeded), so the test set never selects
a checkpoint. In DDP the main process loads (and downloads) first; the others wait, then read the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loaders.datasets import load_dataset, random_subset, select_classes, split_train_val
from loaders.datasets.fgvc import load_fgvc
from loaders.datasets.vtab import load_vtab

from . import distributed as pdist
from .options import FinetuneOptions

log = logging.getLogger(__name__)


@dataclass
class Data:
    train_images: torch.Tensor  # uint8 (N, H, W, C) on the training device
    train_labels: torch.Tensor  # int64 (N,) on the training device
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    name: str
    splits: dict  # which split of the source trained, selected and tested: {"train": ..., "val": ..., "test": ...}



# Benchmark protocols: which list trains, which selects (None: the last epoch is kept), which tests (None: none).
# The test split is evaluated once, at the end, on the model the validation split (or the last epoch) chose.
PROTOCOL_SPLITS = {
    ("vtab-1k", "final"): ("train800val200", None, "test"),
    ("vtab-1k", "tune"): ("train800", "val200", None),
    ("fgvc", "final"): ("train", "val", "test"),
    ("fgvc", "tune"): ("train", "val", "test"),
}


def _benchmark_data(opts: FinetuneOptions, ctx: pdist.DistContext) -> Data:
    kind, _, name = opts.data.partition(":")
    train_split, val_split, test_split = PROTOCOL_SPLITS[(kind, opts.protocol)]
    size = opts.image_size or 224  # the official pipeline's resolution

    def load(split):
        if split is None:
            return None
        if kind == "vtab-1k":
            return load_vtab(name, split, opts.data_root, size)
        return load_fgvc(name, split, opts.data_root, size)

    if ctx.is_main:  # the main process decodes and writes the cache; the others wait, then read it
        train = load(train_split)
    pdist.barrier(ctx)
    if not ctx.is_main:
        train = load(train_split)
    val, test = load(val_split), load(test_split)
    empty = train.subset(torch.zeros(0, dtype=torch.int64))
    train = random_subset(train, opts.max_train_samples, opts.seed)
    val = random_subset(val, opts.max_eval_samples, opts.seed + 1) if val is not None else empty
    test = random_subset(test, opts.max_eval_samples, opts.seed + 2) if test is not None else empty
    splits = {"train": train_split, "val": val_split, "test": test_split}
    log.info("data %s (%s protocol): trains on %s (%d), selects on %s, tests on %s", opts.data, opts.protocol,
             train_split, len(train.labels), val_split or "the last epoch", test_split or "nothing (tuning)")
    dev = ctx.device
    return Data(train.images.to(dev), train.labels.to(dev), val.images.to(dev), val.labels.to(dev),
                test.images.to(dev), test.labels.to(dev), list(train.classes), train.name, splits)


def prepare_data(opts: FinetuneOptions, ctx: pdist.DistContext) -> Data:
    """Train/val/test splits as uint8 tensors on the device; the validation split is held out from train
    (VTAB-1k and FGVC bring their own splits, chosen by ``--protocol``)."""
    if opts.data.startswith(("vtab-1k:", "fgvc:")):
        return _benchmark_data(opts, ctx)

    def load(split):
        ds = load_dataset(opts.data, root=opts.data_root, split=split)
        return select_classes(ds, opts.classes) if opts.classes else ds

    if ctx.is_main:  # the main process downloads; the others wait, then read the cache
        train = load("train")
    pdist.barrier(ctx)
    if not ctx.is_main:
        train = load("train")
    test = load("test")
    if opts.val_fraction > 0:
        train, val = split_train_val(train, opts.val_fraction, opts.seed)
    else:
        log.warning("--val-fraction 0: no validation split, the last epoch is kept (test set never selects)")
        val = train.subset(torch.zeros(0, dtype=torch.int64))
    train = random_subset(train, opts.max_train_samples, opts.seed)
    val = random_subset(val, opts.max_eval_samples, opts.seed + 1)
    test = random_subset(test, opts.max_eval_samples, opts.seed + 2)
    log.info("data %s%s: %d train, %d val, %d test images, %d classes, %s pixels", opts.data,
             f" classes {opts.classes}" if opts.classes else "", len(train.labels), len(val.labels),
             len(test.labels), len(train.classes), "x".join(map(str, train.images.shape[1:])))
    dev = ctx.device
    splits = {"train": f"train minus {opts.val_fraction:g} held out" if opts.val_fraction else "train",
              "val": f"{opts.val_fraction:g} of train" if opts.val_fraction else None, "test": "test"}
    return Data(train.images.to(dev), train.labels.to(dev), val.images.to(dev), val.labels.to(dev),
                test.images.to(dev), test.labels.to(dev), list(train.classes), train.name, splits)
