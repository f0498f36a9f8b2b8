"""Choosing what to train on: class subsets (relabelled 0..k-1), stratified validation splits, random caps."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np
import torch

from .base import ImageDataset

def describe_classes(classes: Sequence[str], limit: int = 20) -> str:
    """"the 3 classes 0 bird, 1 cat, 2 dog" (the first ``limit`` of many, then how many more)."""
    shown = ", ".join(f"{i} {c}" for i, c in enumerate(list(classes)[:limit]))
    more = f", ... ({len(classes) - limit} more)" if len(classes) > limit else ""
    return f"the {len(classes)} classes {shown}{more}"


def parse_class_spec(spec: str | int | Sequence[int | str], classes: Sequence[str] | None) -> list[int]:
    """Class indices from "0-4" (inclusive range), "1,3,5", "0-2,7", class names ("cat,dog", mixed with indices:
    "cat,3"), an int, or a list of indices/class names. A token of digits (or a range of them) is an index; any
    other token is a class name. ``classes`` None checks the syntax only (names and indices are not looked up).
    Errors (ValueError) name the classes that exist."""
    known = None if classes is None else list(classes)
    index = {c: i for i, c in enumerate(known or [])}
    out: list[int] = []
    unknown: list[str] = []

    def add_name(name: str) -> None:
        if known is None:
            out.append(-1)  # syntax only
        elif name in index:
            out.append(index[name])
        else:
            unknown.append(name)

    if isinstance(spec, str):
        tokens = [t.strip() for t in spec.split(",")]
        if not spec.strip() or any(not t for t in tokens):
            raise ValueError(f"bad class spec {spec!r}: expected e.g. '0-4', '1,3,5', '0-2,7' or 'cat,dog'")
        for t in tokens:
            lo, dash, hi = t.partition("-")
            if t.isdigit():
                out.append(int(t))
            elif dash and lo.strip().isdigit() and hi.strip().isdigit():
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError(f"bad class spec {spec!r}: empty range {t!r}")
                out.extend(range(a, b + 1))
            else:
                add_name(t)
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        out = [int(spec)]
    else:
        for s in spec:
            if isinstance(s, str):
                add_name(s)
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                out.append(int(s))
            else:
                raise ValueError(f"bad class spec entry {s!r}: not an index nor a class name")
    if unknown:
        raise ValueError(f"class spec {spec!r}: no class named {', '.join(map(repr, unknown))}; there are "
                         f"{describe_classes(known)}")
    if not out:
        raise ValueError(f"class spec {spec!r} selects no class")
    if known is None:
        return out
    k = len(known)
    bad = [c for c in out if not 0 <= c < k]
    if bad:
        raise ValueError(f"class spec {spec!r}: index(es) {bad} out of range: there are {describe_classes(known)}")
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
