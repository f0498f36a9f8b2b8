"""The data of a run: train/val/test splits as uint8 tensors on the training device.

The validation split is held out from the training split (stratified, seeded), so the test set never selects
a checkpoint. In DDP the main process loads (and downloads) first; the others wait, then read the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loaders.datasets import load_dataset, random_subset, select_classes, split_train_val

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



def prepare_data(opts: FinetuneOptions, ctx: pdist.DistContext) -> Data:
    """Train/val/test splits as uint8 tensors on the device; the validation split is held out from train."""
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
    return Data(train.images.to(dev), train.labels.to(dev), val.images.to(dev), val.labels.to(dev),
                test.images.to(dev), test.labels.to(dev), list(train.classes), train.name)
