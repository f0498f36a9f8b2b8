"""Predictions: softmax probabilities over a dataset (exact under data parallelism), a saved run's evaluation
re-created from its checkpoint, and the top classes of image files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loaders.images import read_image
from loaders.npz import ZERO_HEAD_MESSAGE, has_zero_head
from loaders.transforms import BatchTransform

from . import distributed as pdist
from . import report
from ..adapters import set_adapter
from .checkpoint import CheckpointMismatch, load_model_from_checkpoint, load_tasks
from .data import prepare_data
from .options import FinetuneOptions

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model, images: torch.Tensor, transform, batch_size: int, ctx: pdist.DistContext | None = None,
            autocast_dtype: torch.dtype | None = None, desc: str | None = None) -> torch.Tensor:
    """Softmax probabilities (n, K) for uint8 images (n, H, W, C), on every rank, in the original order.

    Each rank predicts its contiguous shard (no padding, so nothing is counted twice); shards are gathered.
    """
    ctx = ctx or pdist.DistContext()
    n = images.shape[0]
    start, stop = pdist.shard_bounds(n, ctx.rank, ctx.world_size)
    was_training = model.training
    model.eval()
    out = []
    steps = range(start, stop, batch_size)
    for i in tqdm(steps, desc=desc or "eval", leave=False, disable=not ctx.is_main or desc is None):
        x = transform(images[i:min(i + batch_size, stop)].to(ctx.device, non_blocking=True))
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
    d = prepare_data(opts, ctx)
    if d.classes != meta["classes"]:
        raise ValueError(f"dataset {opts.data!r} gives classes {d.classes}, the checkpoint was trained on "
                         f"{meta['classes']}")
    images, labels = (d.test_images, d.test_labels) if split == "test" else (d.val_images, d.val_labels)
    tf = BatchTransform(model.config.image_size, train=False)
    dtype = pdist.autocast_dtype(opts.precision, ctx.device)
    probs = predict(model, images, tf, batch_size, ctx, dtype, desc=split)
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


@torch.no_grad()
def predict_files(model, paths, classes: list[str], top_k: int = 5, device="cpu") -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image file, resized with the evaluation transform.

    A model whose head is all zero (Google's ImageNet-21k files) raises instead of reporting "class 0, 0.00".
    """
    if has_zero_head(model):
        raise CheckpointMismatch(ZERO_HEAD_MESSAGE)
    tf = BatchTransform(model.config.image_size, train=False)
    model.eval()
    results = []
    for p in paths:
        probs = model(tf(torch.from_numpy(read_image(p).copy())[None].to(device))).float().softmax(-1)[0].cpu()
        values, idx = probs.topk(min(top_k, probs.numel()))
        results.append([(classes[i] if i < len(classes) else str(i), float(v)) for v, i in
                        zip(values.tolist(), idx.tolist())])
    return results


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
