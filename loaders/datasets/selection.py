"""Choosing what to train on: class subsets (relabelled 0..k-1), stratified validation splits, random caps."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
import torch

from .base import ImageDataset

def parse_class_spec(spec: str | int | Sequence[int | str], classes: Sequence[str]) -> list[int]:
    """Class indices from "0-4" (inclusive range), "1,3,5", "0-2,7", an int, or a list of indices/class names."""
    k = len(classes)
    if isinstance(spec, str):
        tokens = [t.strip() for t in spec.split(",")]
        if not spec.strip() or any(not t for t in tokens):
            raise ValueError(f"bad class spec {spec!r}: expected e.g. '0-4', '1,3,5' or '0-2,7'")
        out = []
        for t in tokens:
            lo, dash, hi = t.partition("-")
            try:
                a, b = (int(lo), int(hi)) if dash else (int(t), int(t))
            except ValueError:
                raise ValueError(f"bad class spec {spec!r}: {t!r} is neither an index nor a range a-b") from None
            if a > b:
                raise ValueError(f"bad class spec {spec!r}: empty range {t!r}")
            out.extend(range(a, b + 1))
    elif isinstance(spec, int):
        out = [spec]
    else:
        out = []
        for s in spec:
            if isinstance(s, str) and s in classes:
                out.append(list(classes).index(s))
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                out.append(int(s))
            else:
                raise ValueError(f"bad class spec entry {s!r}: not an index nor one of the class names")
    if not out:
        raise ValueError(f"class spec {spec!r} selects no class")
    bad = [c for c in out if not 0 <= c < k]
    if bad:
        raise ValueError(f"class spec {spec!r}: index(es) {bad} out of range for {k} classes (0-{k - 1})")
    dup = sorted(c for c, n in collections.Counter(out).items() if n > 1)
    if dup:
        raise ValueError(f"class spec {spec!r}: class(es) {dup} selected twice")
    return out


def select_classes(ds: ImageDataset, spec) -> ImageDataset:
    """Keep only the classes in `spec` (see parse_class_spec); they are relabelled 0..k-1 in the order of the spec
    and keep their names. Image order is preserved."""
    keep = parse_class_spec(spec, ds.classes)
    mapping = torch.full((ds.num_classes,), -1, dtype=torch.int64)
    mapping[torch.tensor(keep)] = torch.arange(len(keep))
    new = mapping[ds.labels.cpu()]
    idx = (new >= 0).nonzero().squeeze(1)
    return ImageDataset(ds.subset(idx).images, new[idx].to(ds.labels.device), [ds.classes[c] for c in keep], ds.name)


def split_indices(labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified train/val index split (sorted index tensors, disjoint, covering all). Each class with n >= 2
    images gives round(n * val_fraction) of them to val, at least 1 and at most n - 1; the choice depends only on
    (labels, val_fraction, seed)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = 0 if len(idx) < 2 else min(max(round(len(idx) * val_fraction), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def split_train_val(ds: ImageDataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Stratified, deterministic (train, val) split of a train set, for choosing checkpoints without the test set."""
    train_idx, val_idx = split_indices(ds.labels, val_fraction, seed)
    return ds.subset(train_idx, f"{ds.name}:train"), ds.subset(val_idx, f"{ds.name}:val")



def random_subset(ds: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """A seeded random subset of n items in their original order (the whole set when n is None or larger)."""
    if n is None or n >= len(ds.labels):
        return ds
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds.labels), generator=g)[:n].sort().values)
