"""The data of a run: train/val/test splits, each an :class:`~loaders.datasets.ImageDataset`.

Small sets (CIFAR, Fashion-MNIST, Tiny-ImageNet) are tensors moved to the training device once, as before.
Image folders, CSV lists, VTAB-1k and FGVC are decoded once into a memory-mapped cache
(``loaders.datasets.cache``) and streamed in batches (``loaders.datasets.stream``): a run's memory does not grow
with the dataset. The validation split is held out from the training split (stratified, seeded), so the test set
never selects a checkpoint; a flat folder or a CSV list also gets its test split held out (``--test-fraction``),
and the file lists of every split are written to the run folder (``splits/``) for ``tools/evaluate.py``.
In DDP the main process loads (decodes, downloads) first; the others wait, then read the cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loaders.datasets import (LIST_SUFFIXES, DatasetError, ImageDataset, load_dataset, open_source, parse_class_spec,
                              random_subset, select_classes, split_train_val)
from loaders.datasets.fgvc import load_fgvc, store_side
from loaders.datasets.lists import read_text
from loaders.datasets.vtab import load_vtab
from loaders.images import StorePolicy
from loaders.transforms_factory import create_transforms

from . import distributed as pdist
from . import report
from .options import NORMALISERS, FinetuneOptions, OptionsError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
SPLITS_FORMAT = 1  # splits/<split>.json


@dataclass
class Data:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    name: str
    splits: dict  # which split of the source trained, selected and tested: {"train": ..., "val": ..., "test": ...}
    counts: dict = field(default_factory=dict)  # per split: {"decoded": n, "from_cache": n, "skipped": n}
    skipped: list = field(default_factory=list)  # (relative path, reason) of files that could not be decoded
    files: dict | None = None  # per split, the relative path and label of each image (folders and lists)
    photos: bool = False  # images of any size (random-resized-crop / centre-crop transforms)
    stored: int | None = None  # images stored at stored² and cropped to the input size (FGVC's official 256 -> 224)
    outside: list = field(default_factory=list)  # (relative path, reason) of images beside the class folders


# Benchmark protocols: which list trains, which selects (None: the last epoch is kept), which tests (None: none).
# The test split is evaluated once, at the end, on the model the validation split (or the last epoch) chose.
PROTOCOL_SPLITS = {
    ("vtab-1k", "final"): ("train800val200", None, "test"),
    ("vtab-1k", "tune"): ("train800", "val200", None),
    ("fgvc", "final"): ("trainval", None, "test"),  # the official final run (RLRR train_fgvc.py:152)
    ("fgvc", "tune"): ("train", "val", None),
}


def image_kind(photos: bool, stored: int | None) -> str:
    """What the images of a run are, for :mod:`loaders.transforms_factory`: "stored" (a fixed stored² larger than
    the input, FGVC's 256²), "photos" (any size) or "fixed" (small images of one size)."""
    return "stored" if stored else "photos" if photos else "fixed"


def run_transforms(opts: FinetuneOptions, data: "Data", image_size: int):
    """A run's (training, evaluation) transforms: its options and its data's kind, through
    :func:`loaders.transforms_factory.create_transforms` (the one path from options to the batch)."""
    mean, std = NORMALISERS[opts.normalise]
    return create_transforms(image_size, image_kind(data.photos, data.stored), data.stored, opts.augment, opts.crop,
                             opts.flip, opts.crop_scale_range(), opts.crop_pct, mean, std)


def is_photo_source(data: str) -> bool:
    """An image folder or a CSV/TSV list (not a named dataset, not a benchmark task)."""
    if data.startswith(("vtab-1k:", "fgvc:")):
        return False
    p = Path(data).expanduser()
    return p.is_dir() or (p.suffix.lower() in LIST_SUFFIXES and p.is_file())


def _on_device(ds: ImageDataset, dev) -> ImageDataset:
    """In-memory sets move to the device whole; disk-backed ones stay where they are (streamed)."""
    if ds.on_disk:
        return ds
    return ImageDataset(ds.images.to(dev), ds.labels.to(dev), ds.classes, ds.name)


def _main_first(ctx, load):
    """Run ``load`` on the main process first (it decodes or downloads), then on the others."""
    if ctx.is_main:
        out = load()
    pdist.barrier(ctx)
    if not ctx.is_main:
        out = load()
    return out


def _benchmark_data(opts: FinetuneOptions, ctx: pdist.DistContext) -> Data:
    kind, _, name = opts.data.partition(":")
    train_split, val_split, test_split = PROTOCOL_SPLITS[(kind, opts.protocol)]
    size = opts.image_size or 224  # the official pipeline's resolution
    show = opts.progress and ctx.is_main

    def load(split):
        if split is None:
            return None
        if kind == "vtab-1k":
            return load_vtab(name, split, opts.data_root, size, opts.workers, show)
        return load_fgvc(name, split, opts.data_root, size, opts.workers, show)

    train = _main_first(ctx, lambda: load(train_split))
    val, test = load(val_split), load(test_split)
    counts = {s: d.load_counts for s, d in (("train", train), ("val", val), ("test", test)) if d is not None}
    empty = train.subset(torch.zeros(0, dtype=torch.int64))
    train, val, test = capped(opts, train, val if val is not None else empty, test if test is not None else empty)
    splits = {"train": train_split, "val": val_split, "test": test_split}
    log.info("data %s (%s protocol): trains on %s (%d), selects on %s, tests on %s", opts.data, opts.protocol,
             train_split, len(train.labels), val_split or "the last epoch", test_split or "nothing (tuning)")
    return Data(train, val, test, list(train.classes), train.name, splits, counts,
                stored=store_side(size) if kind == "fgvc" else None)


def capped(opts: FinetuneOptions, train: ImageDataset, val: ImageDataset, test: ImageDataset):
    """The last step of every source's splits: the seeded caps (--max-train-samples, --max-eval-samples), and the
    one warning when nothing is held out for validation."""
    if not opts.val_fraction and not opts.data.startswith(("vtab-1k:", "fgvc:")):
        log.warning("--val-fraction 0: no validation split, the last epoch is kept (test set never selects)")
    return (random_subset(train, opts.max_train_samples, opts.seed),
            random_subset(val, opts.max_eval_samples, opts.seed + 1),
            random_subset(test, opts.max_eval_samples, opts.seed + 2))


def stratified_holdout(labels: np.ndarray, fractions: dict[str, float], seed: int, classes: list[str]) -> dict:
    """Indices of each split, per class: round(n · fraction) (at least 1 where the fraction is > 0) go to each
    held-out split, the rest trains; a class left without a training image is an error naming it."""
    g = np.random.default_rng(seed)
    out = {s: [] for s in ("train", *fractions)}
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        idx = idx[g.permutation(len(idx))]
        start = 0
        for split, frac in fractions.items():
            k = max(1, round(len(idx) * frac)) if frac > 0 else 0
            out[split].append(idx[start:start + k])
            start += k
        if start >= len(idx):
            need = 1 + sum(1 for f in fractions.values() if f > 0)
            flags = " and ".join(f"--{s.replace('_', '-')}-fraction {f:g}" for s, f in fractions.items() if f > 0)
            raise DatasetError(f"class {classes[c]!r} has {len(idx)} image(s); {flags} need at least {need} per "
                               "class (one to train, one for each held-out split): add images or lower the fractions")
        out["train"].append(idx[start:])
    return {s: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for s, v in out.items()}


def read_split_files(folder: Path) -> dict[str, list[str]] | None:
    """The split lists a run wrote, or None if there are none: ``splits/<split>.json`` (every name exactly), else
    the ``splits/<split>.txt`` of older runs (relative path and class per line)."""
    if (folder / "train.json").is_file():
        return {s: [p for p, _ in json.loads(read_text(folder / f"{s}.json"))["files"]]
                for s in SPLIT_NAMES if (folder / f"{s}.json").is_file()}
    if not (folder / "train.txt").is_file():
        return None
    return {s: [line.rsplit("\t", 1)[0] for line in read_text(folder / f"{s}.txt").splitlines() if line]
            for s in SPLIT_NAMES if (folder / f"{s}.txt").is_file()}


def check_classes(opts: FinetuneOptions, classes) -> list[int]:
    """The indices --classes selects among ``classes``; a usage error naming the classes that exist."""
    try:
        return parse_class_spec(opts.classes, classes)
    except ValueError as e:
        raise OptionsError(f"--classes {opts.classes}: {str(e).split(': ', 1)[-1]} (in --data {opts.data})") from None


def _photo_data(opts: FinetuneOptions, ctx: pdist.DistContext, image_size: int, recorded: dict | None) -> Data:
    policy = StorePolicy.for_photos(image_size, opts.crop_pct, opts.store_size)
    show = opts.progress and ctx.is_main
    check = (lambda classes: check_classes(opts, classes)) if opts.classes else None
    src = _main_first(ctx, lambda: open_source(opts.data, policy, opts.workers, show, check, opts.drop_empty_classes))
    ds, paths, group, decoded = src.dataset, src.paths, src.group, src.decoded
    if opts.classes:  # keep those classes (relabelled 0..k-1 in the spec's order) before splitting
        keep = np.flatnonzero(np.isin(ds.labels.numpy(), check_classes(opts, ds.classes)))
        ds = select_classes(ds, opts.classes)
        paths, group, decoded = [paths[i] for i in keep], group[keep], decoded[keep]
    labels = ds.labels.numpy()
    if recorded is not None:  # the run's own lists (tools/evaluate.py): the same images, whatever was added since
        where = {p: i for i, p in enumerate(paths)}
        missing = [p for s in recorded.values() for p in s if p not in where]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) of the run's split lists are not in {opts.data} or no longer "
                               f"decode, e.g. {missing[0]!r} (to score another folder: tools/predict.py --data)")
        parts = {s: np.array([where[p] for p in recorded.get(s, [])], np.int64) for s in SPLIT_NAMES}
    elif src.has_test:
        trainable = np.flatnonzero(group == "train")
        held = stratified_holdout(labels[trainable], {"val": opts.val_fraction}, opts.seed, ds.classes)
        parts = {"train": trainable[held["train"]], "val": trainable[held["val"]], "test": np.flatnonzero(group == "test")}
    else:
        parts = stratified_holdout(labels, {"val": opts.val_fraction, "test": opts.test_fraction}, opts.seed,
                                   ds.classes)
    splits = {s: ds.subset(torch.from_numpy(v), f"{ds.name}-{s}") for s, v in parts.items()}
    files = {s: [(paths[i], ds.classes[labels[i]]) for i in v] for s, v in parts.items()}
    counts = {s: {"decoded": int(decoded[v].sum()), "from_cache": int((~decoded[v]).sum()), "skipped": 0}
              for s, v in parts.items()}
    for g, c in src.counts.items():  # a flat folder's skipped files never reached a split: counted under train
        counts[g]["skipped"] = c["skipped"]
    counts["train"]["outside_classes"] = len(src.outside)  # images beside the class folders, in no class
    train, val, test = capped(opts, splits["train"], splits["val"], splits["test"])
    log.info("data %s: %d train, %d val, %d test images (test: %s), %d classes, %d file(s) skipped", opts.data,
             len(train), len(val), len(test), "its test/ folder" if src.has_test else f"{opts.test_fraction:g} held out",
             len(ds.classes), len(src.skipped))
    names = {"train": f"train minus {opts.val_fraction:g} held out" if opts.val_fraction else "train",
             "val": f"{opts.val_fraction:g} of train" if len(val) else None,
             "test": "test/" if src.has_test else f"{opts.test_fraction:g} of the images held out"}
    return Data(train, val, test, list(ds.classes), ds.name, names, counts, src.skipped, files, photos=True,
                outside=src.outside)


def prepare_data(opts: FinetuneOptions, ctx: pdist.DistContext, image_size: int = 224,
                 split_lists: Path | None = None) -> Data:
    """Train/val/test splits; in-memory sets on the device, disk-backed ones streamed. ``image_size``: the
    model's input size (it sets a folder's stored resolution); ``split_lists``: a run's ``splits/`` folder, to
    rebuild exactly its splits (tools/evaluate.py)."""
    if opts.data.startswith(("vtab-1k:", "fgvc:")):
        return _benchmark_data(opts, ctx)
    if is_photo_source(opts.data):
        recorded = read_split_files(split_lists) if split_lists is not None else None
        return _photo_data(opts, ctx, image_size, recorded)
    return _named_data(opts, ctx)


def _named_data(opts: FinetuneOptions, ctx: pdist.DistContext) -> Data:
    """CIFAR, Fashion-MNIST, Tiny-ImageNet, synthetic: in memory, moved to the device whole."""

    def load(split):
        ds = load_dataset(opts.data, root=opts.data_root, split=split)
        if opts.classes:
            check_classes(opts, ds.classes)
        return select_classes(ds, opts.classes) if opts.classes else ds

    train = _main_first(ctx, lambda: load("train"))
    test = load("test")
    if opts.val_fraction > 0:
        train, val = split_train_val(train, opts.val_fraction, opts.seed)
    else:
        val = train.subset(torch.zeros(0, dtype=torch.int64))
    train, val, test = capped(opts, train, val, test)
    log.info("data %s%s: %d train, %d val, %d test images, %d classes, %s pixels", opts.data,
             f" classes {opts.classes}" if opts.classes else "", len(train.labels), len(val.labels),
             len(test.labels), len(train.classes), "x".join(map(str, train.images.shape[1:])))
    dev = ctx.device
    splits = {"train": f"train minus {opts.val_fraction:g} held out" if opts.val_fraction else "train",
              "val": f"{opts.val_fraction:g} of train" if opts.val_fraction else None, "test": "test"}
    counts = {s: {"decoded": 0, "from_cache": 0, "in_memory": len(d), "skipped": 0}
              for s, d in (("train", train), ("val", val), ("test", test))}
    return Data(_on_device(train, dev), _on_device(val, dev), _on_device(test, dev), list(train.classes), train.name,
                splits, counts)


def write_split_files(data: Data, folder: Path) -> None:
    """``<run>/splits/{train,val,test}.json``: ``{"files": [[relative path, class name], ...]}``. JSON strings
    round-trip any name the file system allows: a newline is escaped, and a name that is not valid UTF-8 (its
    bytes read as surrogate escapes) is written as ``\\udcXX`` escapes and read back to the same name."""
    if not data.files:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in data.files.items():
        report.write_json({"format": SPLITS_FORMAT, "split": split, "files": [[p, c] for p, c in rows]},
                          folder / f"{split}.json")


def printable_name(name: str) -> str:
    """A file name for a line of text: newlines, tabs and bytes that are not UTF-8 shown as backslash escapes."""
    if name.isprintable():
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    out = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in out)


def write_skipped(data: Data, path: Path) -> None:
    """``skipped.txt``: one line per file left out (undecodable, or beside the class folders), with the reason."""
    rows = data.skipped + data.outside
    report.write_text("".join(f"{printable_name(p)}\t{why}\n" for p, why in rows), path)
