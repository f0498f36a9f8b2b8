"""Predictions: softmax probabilities over a dataset (exact under data parallelism), a saved run's evaluation
re-created from its checkpoint, and the top classes of image files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

import torch
from tqdm.auto import tqdm

from loaders.datasets import DataNotFoundError, ImageDataset, decode_cached
from loaders.datasets.folder import walk_images
from loaders.datasets.stream import BatchStream
from loaders.images import StorePolicy, read_image
from loaders.npz import ZERO_HEAD_MESSAGE, has_zero_head
from loaders.transforms import BatchTransform

from . import distributed as pdist
from . import report
from ..tasks import set_adapter
from .checkpoint import CheckpointMismatch
from .rebuild import load_model_from_checkpoint, load_tasks
from .data import prepare_data
from .options import NORMALISERS, FinetuneOptions

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
    lists = Path(meta["path"]).parent / "splits"
    d = prepare_data(opts, ctx, model.config.image_size, split_lists=lists if data is None else None)
    if d.classes != meta["classes"]:
        raise CheckpointMismatch(f"dataset {opts.data!r} gives classes {d.classes}, the checkpoint was trained "
                                 f"on {meta['classes']}")
    ds = d.test if split == "test" else d.val
    labels = ds.labels
    tf = eval_transform(model.config.image_size, d.photos, opts.crop_pct, opts.normalise, d.stored)
    dtype = pdist.autocast_dtype(opts.precision, ctx.device)
    probs = predict(model, ds, tf, batch_size, ctx, dtype, desc=split)
    out = Path(output_dir) if output_dir else Path(meta["path"]).parent
    summary = report.write_evaluation_report(out, probs.numpy(), labels.cpu().numpy(), d.classes,
                                             meta.get("history"), prefix=split)
    result = {"checkpoint": meta["path"], "split": split, "mode": meta["mode"], "epoch": meta["epoch"],
              f"{split}_accuracy": summary["accuracy"], **{f"{split}_{k}": v for k, v in summary.items()},
              "trainable_parameters": meta.get("trainable_parameters"),
              "total_parameters": meta.get("total_parameters")}
    report.write_json(result, out / f"{split}_evaluation.json")
    log.info("%s accuracy %.4f on %d images; files in %s", split, summary["accuracy"], summary["num_samples"], out)
    return result




def eval_transform(image_size: int, photos: bool, crop_pct: float = 0.875, normalise: str = "half",
                   stored: int | None = None) -> BatchTransform:
    """The evaluation transform of a run: resize + centre crop for photos, the centre image_size² of images
    stored at ``stored``² (FGVC's official 224 of 256), squash for fixed-size sets."""
    mean, std = NORMALISERS[normalise]
    if stored:
        return BatchTransform(image_size, train=False, resize="center", crop_pct=image_size / stored, mean=mean, std=std)
    if photos:
        return BatchTransform(image_size, train=False, resize="center", crop_pct=crop_pct, mean=mean, std=std)
    return BatchTransform(image_size, train=False, mean=mean, std=std)


def run_transforms(opts, data, image_size: int) -> tuple[BatchTransform, BatchTransform]:
    """A run's training and evaluation transforms. Photos: random resized crop / resize + centre crop; FGVC's
    stored 256² (``data.stored``): a random image_size² window + flip / the centre window, as the official RLRR
    pipeline (``RLRRDatasets/fgvc_tranforms.py``); small fixed-size images: pad + random crop / squash."""
    mean, std = NORMALISERS[opts.normalise]
    train = opts.augment and (opts.crop or opts.flip)
    if data.stored:
        train_tf = BatchTransform(image_size, train=opts.augment, crop="random", flip=opts.flip, mean=mean, std=std)
    elif data.photos:
        train_tf = BatchTransform(image_size, train=train, crop="resized" if opts.crop else "pad",
                                  crop_padding=None if opts.crop else 0, flip=opts.flip, resize="center",
                                  scale=opts.crop_scale_range(), crop_pct=opts.crop_pct, mean=mean, std=std)
    else:
        train_tf = BatchTransform(image_size, train=train, crop_padding=None if opts.crop else 0, flip=opts.flip,
                                  mean=mean, std=std)
    return train_tf, eval_transform(image_size, data.photos, opts.crop_pct, opts.normalise, data.stored)


@torch.no_grad()
def predict_files(model, paths, classes: list[str], top_k: int = 5, device="cpu",
                  transform: BatchTransform | None = None) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image file, with the run's evaluation transform (default: squash).

    A model whose head is all zero (Google's ImageNet-21k files) raises instead of reporting "class 0, 0.00".
    """
    if has_zero_head(model):
        raise CheckpointMismatch(ZERO_HEAD_MESSAGE)
    tf = transform or BatchTransform(model.config.image_size, train=False)
    model.eval()
    results = []
    for p in paths:
        probs = model(tf(torch.from_numpy(read_image(p).copy())[None].to(device))).float().softmax(-1)[0].cpu()
        results.append(_top(probs, classes, top_k))
    return results


def _top(probs: torch.Tensor, classes: list[str], top_k: int) -> list[tuple[str, float]]:
    values, idx = probs.topk(min(top_k, probs.numel()))
    return [(classes[i] if i < len(classes) else str(i), float(v)) for v, i in zip(values.tolist(), idx.tolist())]


def predict_folder(model, folder, classes: list[str], top_k: int = 5, device="cpu", crop_pct: float = 0.875,
                   batch_size: int = 64, workers: int | None = None) -> list[tuple[str, list[tuple[str, float]]]]:
    """(relative path, top-k) for every image under ``folder`` (recursively; hidden files skipped), decoded once
    through the decode cache and evaluated in streamed batches (resize + centre crop). Undecodable files are
    reported with their reason instead of classes."""
    if has_zero_head(model):
        raise CheckpointMismatch(ZERO_HEAD_MESSAGE)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"--data {folder}: not a folder")
    files = walk_images(folder)
    if not files:
        raise DataNotFoundError(f"--data {folder}: no image files")
    size = model.config.image_size
    store, report = decode_cached(files, folder, folder.name, StorePolicy.for_photos(size, crop_pct), workers)
    ok = np.flatnonzero(report.ok)
    ds = ImageDataset(store.subset(ok), torch.zeros(len(ok), dtype=torch.int64), ["?"])
    tf = eval_transform(size, True, crop_pct)
    probs = predict(model, ds, tf, batch_size, pdist.DistContext(device=torch.device(device)))
    tops = {int(i): _top(p, classes, top_k) for i, p in zip(ok, probs)}
    rel = [os.path.relpath(f, folder) for f in files]
    return [(rel[i], tops.get(i) or [(f"(skipped: {report.reasons.get(i)})", float("nan"))]) for i in range(len(files))]


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
