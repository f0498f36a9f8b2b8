"""Predictions: softmax probabilities over a dataset (exact under data parallelism), a saved run's evaluation
re-created from its checkpoint, and the top classes of image files."""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np

import torch
from tqdm.auto import tqdm

from loaders.datasets import DataNotFoundError, DatasetError, ImageDataset, PixelStore, decode_cached, is_named_dataset
from loaders.datasets.fgvc import store_side
from loaders.datasets.folder import walk_images, warn_ignored
from loaders.datasets.stream import BatchStream
from loaders.images import StorePolicy, decode_for_store
from loaders.npz import ZERO_HEAD_MESSAGE, has_zero_head
from loaders.transforms import BatchTransform
from loaders.transforms_factory import create_eval_transform

from . import distributed as pdist
from . import report
from ..tasks import set_adapter
from .checkpoint import CheckpointMismatch
from .rebuild import load_model_from_checkpoint, load_tasks
from .data import image_kind, is_photo_source, prepare_data
from .options import NORMALISERS, FinetuneOptions, OptionsError

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model, images, transform, batch_size: int, ctx: pdist.DistContext | None = None,
            autocast_dtype: torch.dtype | None = None, desc: str | None = None) -> torch.Tensor:
    """Softmax probabilities (n, K), on every rank, in the original order, for ``images``: an ImageDataset (an
    in-memory one or a disk-backed store, streamed in batches) or a uint8 tensor (n, H, W, C).

    Each rank predicts its contiguous shard (no padding, so nothing is counted twice); shards are gathered.
    """
    ctx = ctx or pdist.DistContext()
    if isinstance(images, torch.Tensor):
        images = ImageDataset(images, torch.zeros(len(images), dtype=torch.int64), ["?"])
    n = len(images)
    start, stop = pdist.shard_bounds(n, ctx.rank, ctx.world_size)
    was_training = model.training
    model.eval()
    out = []
    stream = BatchStream(images, torch.arange(start, stop).split(batch_size), ctx.device)
    for batch in tqdm(stream, desc=desc or "eval", leave=False, disable=not ctx.is_main or desc is None):
        x = transform(batch.images, sizes=batch.sizes)
        with torch.autocast(ctx.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(x)
        out.append(logits.float().softmax(-1))
    model.train(was_training)
    k = _num_outputs(model)
    local = torch.cat(out) if out else torch.zeros(0, k, device=ctx.device)
    return pdist.gather_shards(local, n, ctx).cpu()


def _num_outputs(model) -> int:
    m = getattr(model, "module", model)
    return m.config.num_classes



def evaluate_checkpoint(path, output_dir=None, split: str = "test", weights=None, data: str | None = None,
                        data_root: str | None = None, device: str = "auto", batch_size: int = 256,
                        max_samples: int | None = -1, loaded=None) -> dict:
    """Re-create a run's evaluation files from a checkpoint (tools/evaluate.py).

    The data split is rebuilt from the options recorded in the checkpoint (dataset, classes, validation
    fraction and seed), so ``split="val"`` is the same held-out set the run selected on. ``max_samples=-1``
    keeps the run's own ``--max-eval-samples``; None evaluates the whole split. ``loaded``: an already built
    ``(model, meta)`` (one task of a shared backbone, see :func:`evaluate_tasks`).
    """
    ctx = pdist.DistContext(device=pdist.resolve_device(device))
    model, meta = loaded or load_model_from_checkpoint(path, weights=weights, device=ctx.device)
    model.to(ctx.device)
    if has_zero_head(model):
        log.warning("%s: %s", path, ZERO_HEAD_MESSAGE)
    opts = FinetuneOptions.from_dict(meta["options"])
    opts.data = data or opts.data
    opts.data_root = data_root or opts.data_root
    if max_samples != -1:
        opts.max_eval_samples = max_samples
    if data is None:
        check_recorded_data(opts.data)
    lists = Path(meta["path"]).parent / "splits"
    # the run's own lists even with --data (a moved folder): re-splitting a folder that has grown would put
    # training images into the test split
    d = prepare_data(opts, ctx, model.config.image_size, split_lists=lists)
    if d.classes != meta["classes"]:
        raise CheckpointMismatch(f"dataset {opts.data!r} gives classes {d.classes}, the checkpoint was trained "
                                 f"on {meta['classes']}")
    ds = d.test if split == "test" else d.val
    if len(ds) == 0:
        other = "val" if split == "test" else "test"
        flag = {"test": "--test-fraction 0", "val": "--val-fraction 0"}[split]
        raise OptionsError(f"this run has no {split} split ({flag}, or none in the data): nothing to evaluate; "
                           f"try --split {other}")
    labels = ds.labels
    tf = eval_transform(model.config.image_size, d.photos, opts.crop_pct, opts.normalise, d.stored)
    dtype = pdist.autocast_dtype(opts.precision, ctx.device)
    probs = predict(model, ds, tf, batch_size, ctx, dtype, desc=split)
    out = Path(output_dir) if output_dir else Path(meta["path"]).parent
    ev = report.write_evaluation_numbers(out, probs.numpy(), labels.cpu().numpy(), d.classes, meta.get("history"),
                                         prefix=split)
    summary = ev.summary
    files = (d.files or {}).get(split)  # folders and lists: the evaluated images by name (a capped subset has none)
    if files is not None and len(files) == len(ds):
        report.write_predictions_csv(out / f"{split}_predictions.csv", [name for name, _ in files], probs.numpy(),
                                     labels.cpu().numpy(), d.classes)
    result = {"checkpoint": meta["path"], "split": split, "mode": meta["mode"], "epoch": meta["epoch"],
              f"{split}_accuracy": summary["accuracy"], **{f"{split}_{k}": v for k, v in summary.items()},
              "trainable_parameters": meta.get("trainable_parameters"),
              "total_parameters": meta.get("total_parameters")}
    report.write_json(result, out / f"{split}_evaluation.json")  # every number on disk before any figure
    report.write_figures(out, ev, d.classes, meta.get("history"), split)
    log.info("%s accuracy %.4f on %d images; files in %s", split, summary["accuracy"], summary["num_samples"], out)
    return result


def check_recorded_data(data: str) -> None:
    """A run's recorded data that names a folder or list no longer there: one line saying so (it moved)."""
    if data.startswith(("vtab-1k:", "fgvc:")) or is_photo_source(data) or is_named_dataset(data):
        return
    where = "" if Path(data).is_absolute() else f" (a path relative to the directory the run was started from; here: {Path.cwd()})"
    raise DataNotFoundError(f"the run was trained on the image folder {data}{where}, which is not there any more "
                            "(moved or deleted?): pass --data with its new place")


def eval_transform(image_size: int, photos: bool, crop_pct: float = 0.875, normalise: str = "half",
                   stored: int | None = None) -> BatchTransform:
    """The evaluation transform of a run (:func:`loaders.transforms_factory.create_eval_transform`)."""
    mean, std = NORMALISERS[normalise]
    return create_eval_transform(image_size, image_kind(photos, stored), stored, crop_pct, mean, std)


def run_eval_transform(opts: FinetuneOptions, image_size: int) -> BatchTransform:
    """A saved run's evaluation transform, from its recorded options alone (its data folder may have moved)."""
    data = opts.data
    photos = not (data.startswith(("vtab-1k:", "fgvc:")) or is_named_dataset(data))
    stored = store_side(image_size) if data.startswith("fgvc:") else None
    return eval_transform(image_size, photos, opts.crop_pct, opts.normalise, stored)


def decode_files(files, policy: StorePolicy) -> tuple[PixelStore, np.ndarray, dict[int, str]]:
    """Image files decoded as the decode cache would store them (:func:`loaders.images.decode_for_store`), into
    memory: (store of the readable ones, ok (N,) bool, reasons {item: why it cannot be read})."""
    arrays, reasons = [], {}
    for i, f in enumerate(files):
        try:
            arrays.append(decode_for_store(f, policy))
        except Exception as e:  # any reason a file cannot become pixels: named, the others still answered
            reasons[i] = f"{type(e).__name__}: {str(e).replace(chr(10), ' ') or type(e).__name__}"
    ok = np.array([i not in reasons for i in range(len(files))], bool)
    shapes = np.array([a.shape for a in arrays], np.int64).reshape(-1, 3)
    offsets = np.concatenate([[0], np.cumsum(shapes.prod(1))[:-1]]).astype(np.int64) if len(arrays) else shapes[:, 0]
    pixels = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8)
    return PixelStore(pixels, offsets, shapes), ok, reasons


@torch.no_grad()
def predict_images(model, files, classes: list[str], transform: BatchTransform, policy: StorePolicy,
                   top_k: int = 5, device="cpu", batch_size: int = 64, root: Path | None = None,
                   workers: int | None = None) -> list[tuple[Path, list[tuple[str, float]] | None, str | None]]:
    """(file, top-k (class name, probability) or None, why it could not be read or None) for every file, in
    order. The one prediction path of image files: decoded as the decode cache stores them (through the cache of
    ``root`` when given, else in memory), then the run's evaluation transform and :func:`predict` in batches
    of ``batch_size``, so a file answers the same, bit for bit, whichever way it was given. A file that cannot be
    read is reported, never stops the others.

    A model whose head is all zero (Google's ImageNet-21k files) raises instead of reporting "class 0, 0.00".
    """
    if has_zero_head(model):
        raise CheckpointMismatch(ZERO_HEAD_MESSAGE)
    files = [Path(f) for f in files]
    if root is not None:
        store, rep = decode_cached(files, root, root.name, policy, workers)
        ok, reasons = rep.ok, rep.reasons
        store = store.subset(np.flatnonzero(ok))
    else:
        store, ok, reasons = decode_files(files, policy)
    ds = ImageDataset(store, torch.zeros(len(store), dtype=torch.int64), ["?"])
    probs = predict(model, ds, transform, batch_size, pdist.DistContext(device=torch.device(device)))
    tops = dict(zip(np.flatnonzero(ok).tolist(), (_top(p, classes, top_k) for p in probs)))
    return [(f, tops.get(i), reasons.get(i)) for i, f in enumerate(files)]


def predict_files(model, paths, classes: list[str], top_k: int = 5, device="cpu",
                  transform: BatchTransform | None = None, crop_pct: float = 0.875) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image file (:func:`predict_images`); a file that cannot be read raises
    DatasetError naming it."""
    tf = transform or eval_transform(model.config.image_size, True, crop_pct)
    found = predict_images(model, paths, classes, tf, StorePolicy.for_photos(model.config.image_size, crop_pct),
                           top_k, device)
    for f, _, why in found:
        if why is not None:
            raise DatasetError(f"{f}: cannot read the image ({why})")
    return [top for _, top, _ in found]


def _top(probs: torch.Tensor, classes: list[str], top_k: int) -> list[tuple[str, float]]:
    values, idx = probs.topk(min(top_k, probs.numel()))
    return [(classes[i] if i < len(classes) else str(i), float(v)) for v, i in zip(values.tolist(), idx.tolist())]


def folder_images(folder) -> list[Path]:
    """Every image file under ``folder`` (recursively; hidden files skipped); other files named in one warning,
    as in training."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"--data {folder}: not a folder")
    ignored: collections.Counter = collections.Counter()
    files = walk_images(folder, ignored)
    warn_ignored(folder, ignored)
    if not files:
        raise DataNotFoundError(f"--data {folder}: no image files")
    return files


def predict_folder(model, folder, classes: list[str], top_k: int = 5, device="cpu", crop_pct: float = 0.875,
                   batch_size: int = 64, workers: int | None = None,
                   transform: BatchTransform | None = None) -> list[tuple[str, list[tuple[str, float]] | None, str | None]]:
    """(relative path, top-k or None, reason or None) for every image under ``folder``, decoded once through
    the decode cache (:func:`predict_images`)."""
    folder = Path(folder).expanduser()
    files = folder_images(folder)
    size = model.config.image_size
    tf = transform or eval_transform(size, True, crop_pct)
    found = predict_images(model, files, classes, tf, StorePolicy.for_photos(size, crop_pct), top_k, device,
                           batch_size, root=folder, workers=workers)
    return [(os.path.relpath(f, folder), top, why) for f, top, why in found]


def evaluate_tasks(paths, output_dir=None, split: str = "test", weights=None, data_root=None, device: str = "auto",
                   batch_size: int = 256, max_samples: int | None = -1) -> list[dict]:
    """Evaluate several adapter checkpoints over one shared backbone (one base model in memory), each on its own
    data; reports go to ``<output_dir>/<task>`` (default: each checkpoint's folder)."""
    model, metas = load_tasks(paths, weights)
    results = []
    for name, meta in metas.items():
        set_adapter(model, name)
        out = Path(output_dir) / name if output_dir else None
        results.append({"task": name, **evaluate_checkpoint(meta["path"], out, split, weights, None, data_root, device,
                                                            batch_size, max_samples, loaded=(model, meta))})
    return results
