"""Evaluation: predictions over a dataset (exact under data parallelism), metrics computed with numpy, and the
report files (confusion matrix, per-class precision/recall/F1, one-vs-rest ROC curves, training curves).

ROC/AUC are computed here rather than with scikit-learn (not a dependency): sort scores descending, move the
threshold past one *distinct* score at a time (tied scores move together, so ties give a diagonal segment, the
usual convention), and integrate TPR over FPR with the trapezoid rule.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from loaders.atomic import atomic_write

from . import distributed as pdist

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ predicting

@torch.no_grad()
def predict(model, images: torch.Tensor, transform, batch_size: int, ctx: pdist.DistContext | None = None,
            autocast_dtype: torch.dtype | None = None, desc: str | None = None) -> torch.Tensor:
    """Softmax probabilities (n, K) for uint8 images (n, H, W, C), on every rank, in the original order.

    Each rank predicts its contiguous shard (no padding, so nothing is counted twice); shards are gathered.
    """
    from tqdm.auto import tqdm

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


def accuracy_counts(probs: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    return int((probs.argmax(-1) == labels).sum()), int(labels.numel())


# ------------------------------------------------------------------------------------------------ metrics

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts (K, K): rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall per class on the diagonal); rows of absent classes stay zero."""
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)


def precision_recall_f1(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual.astype(np.int64)}


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive rates at every distinct threshold, starting at (0, 0). Returns (fpr, tpr, thresholds).

    Raises ValueError when there are no positives or no negatives (the curve is undefined).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs positives and negatives, got {n_pos} positive and {n_neg} negative")
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    tp, fp = np.cumsum(p), np.cumsum(~p)
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # one point per distinct score
    fpr = np.r_[0.0, fp[last_of_tie] / n_neg]
    tpr = np.r_[0.0, tp[last_of_tie] / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auc(fpr, tpr) -> float:
    """Area under a curve given by increasing x (trapezoid rule)."""
    x, y = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def one_vs_rest_roc(probs, labels, num_classes: int) -> list[dict]:
    """Per class: {"fpr", "tpr", "auc"} treating that class as positive (auc None if the class is absent)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    curves = []
    for k in range(num_classes):
        positive = labels == k
        if positive.all() or not positive.any():
            curves.append({"fpr": None, "tpr": None, "auc": None})
            continue
        fpr, tpr, _ = roc_curve(probs[:, k], positive)
        curves.append({"fpr": fpr, "tpr": tpr, "auc": auc(fpr, tpr)})
    return curves


# ------------------------------------------------------------------------------------------------ report files

def write_json(obj, path: Path) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def write_history_csv(history: list[dict], path: Path) -> None:
    """One row per epoch; columns from the union of the keys, in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss (train/val) and accuracy (train/val) against epoch."""
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_l), ("accuracy", ax_a)):
        for split in ("train", "val"):
            ys = [h.get(f"{split}_{key}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, ys, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(cm_norm: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    import matplotlib.pyplot as plt

    k = len(classes)
    size = max(4.0, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm_norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                v = cm_norm[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)")
    ax.set_title(title or "normalised confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(curves: list[dict], classes: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, c in zip(classes, curves):
        if c["auc"] is not None:
            ax.plot(c["fpr"], c["tpr"], lw=1, label=f"{name} (AUC {c['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC")
    if len(classes) <= 20:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def classification_report_text(report: dict, classes: list[str]) -> str:
    width = max(12, max(len(c) for c in classes) + 2)
    lines = [f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for i, name in enumerate(classes):
        lines.append(f"{name:<{width}}{report['precision'][i]:>10.4f}{report['recall'][i]:>10.4f}"
                     f"{report['f1'][i]:>10.4f}{report['support'][i]:>10d}")
    n = int(report["support"].sum())
    lines.append("")
    lines.append(f"{'macro avg':<{width}}{report['precision'].mean():>10.4f}{report['recall'].mean():>10.4f}"
                 f"{report['f1'].mean():>10.4f}{n:>10d}")
    lines.append(f"{'accuracy':<{width}}{'':>20}{report['accuracy']:>10.4f}{n:>10d}")
    return "\n".join(lines) + "\n"


def write_evaluation_report(out_dir: str | os.PathLike, probs, labels, classes: list[str],
                            history: list[dict] | None = None, prefix: str = "test") -> dict:
    """Write every evaluation artefact for one split; returns a summary (accuracy, macro F1, mean AUC).

    Files: {prefix}_confusion.png (+ .csv counts), {prefix}_report.txt/.json/.csv, {prefix}_roc.png, and with a
    history also history.csv and curves.png.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    k = len(classes)
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, k)
    cm_norm = normalize_rows(cm)
    np.savetxt(out / f"{prefix}_confusion.csv", cm, fmt="%d", delimiter=",", header=",".join(classes))
    accuracy = float((preds == labels).mean()) if labels.size else 0.0
    plot_confusion(cm_norm, classes, out / f"{prefix}_confusion.png", f"{prefix}: accuracy {accuracy:.4f}")

    report = precision_recall_f1(cm)
    report["accuracy"] = accuracy
    curves = one_vs_rest_roc(probs, labels, k)
    aucs = [c["auc"] for c in curves]
    (out / f"{prefix}_report.txt").write_text(classification_report_text(report, classes))
    per_class = [{"class": name, "precision": float(report["precision"][i]), "recall": float(report["recall"][i]),
                  "f1": float(report["f1"][i]), "support": int(report["support"][i]), "auc": aucs[i]}
                 for i, name in enumerate(classes)]
    valid = [a for a in aucs if a is not None]
    summary = {"accuracy": accuracy, "macro_precision": float(report["precision"].mean()),
               "macro_recall": float(report["recall"].mean()), "macro_f1": float(report["f1"].mean()),
               "mean_auc": float(np.mean(valid)) if valid else None, "num_samples": int(labels.size)}
    write_json({"summary": summary, "classes": per_class}, out / f"{prefix}_report.json")
    with open(out / f"{prefix}_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(per_class[0]))
        w.writeheader()
        w.writerows(per_class)
    plot_roc(curves, classes, out / f"{prefix}_roc.png")
    if history:
        write_history_csv(history, out / "history.csv")
        plot_curves(history, out / "curves.png")
    return summary


# ------------------------------------------------------------------------------------------ saved checkpoints

def evaluate_checkpoint(path, output_dir=None, split: str = "test", weights=None, data: str | None = None,
                        data_root: str | None = None, device: str = "auto", batch_size: int = 256,
                        max_samples: int | None = -1) -> dict:
    """Re-create a run's evaluation files from a checkpoint (tools/evaluate.py).

    The data split is rebuilt from the options recorded in the checkpoint (dataset, classes, validation
    fraction and seed), so ``split="val"`` is the same held-out set the run selected on. ``max_samples=-1``
    keeps the run's own ``--max-eval-samples``; None evaluates the whole split.
    """
    from . import checkpoint as ckpt_io
    from . import training
    from loaders.transforms import BatchTransform

    ctx = pdist.DistContext(device=pdist.resolve_device(device))
    model, meta = ckpt_io.load_model_from_checkpoint(path, weights=weights, device=ctx.device)
    known = {f.name for f in training.dataclasses.fields(training.FinetuneOptions)}
    opts = training.FinetuneOptions(**{k: v for k, v in meta["options"].items() if k in known})
    opts.data = data or opts.data
    opts.data_root = data_root or opts.data_root
    if max_samples != -1:
        opts.max_eval_samples = max_samples
    d = training.prepare_data(opts, ctx)
    if d.classes != meta["classes"]:
        raise ValueError(f"dataset {opts.data!r} gives classes {d.classes}, the checkpoint was trained on "
                         f"{meta['classes']}")
    images, labels = (d.test_images, d.test_labels) if split == "test" else (d.val_images, d.val_labels)
    tf = BatchTransform(model.config.image_size, train=False)
    dtype = training.autocast_dtype(opts.precision, ctx.device)
    probs = predict(model, images, tf, batch_size, ctx, dtype, desc=split)
    out = Path(output_dir) if output_dir else Path(meta["path"]).parent
    summary = write_evaluation_report(out, probs.numpy(), labels.cpu().numpy(), d.classes, meta.get("history"),
                                      prefix=split)
    result = {"checkpoint": meta["path"], "split": split, "mode": meta["mode"], "epoch": meta["epoch"],
              f"{split}_accuracy": summary["accuracy"], **{f"{split}_{k}": v for k, v in summary.items()},
              "trainable_parameters": meta.get("trainable_parameters"),
              "total_parameters": meta.get("total_parameters")}
    write_json(result, out / f"{split}_evaluation.json")
    log.info("%s accuracy %.4f on %d images; files in %s", split, summary["accuracy"], summary["num_samples"], out)
    return result


def load_image_file(path) -> torch.Tensor:
    """An image file as uint8 (1, H, W, 3) (PIL, which matplotlib already depends on)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())[None]


@torch.no_grad()
def predict_files(model, paths, classes: list[str], top_k: int = 5, device="cpu") -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image file, resized with the evaluation transform."""
    from loaders.transforms import BatchTransform

    tf = BatchTransform(model.config.image_size, train=False)
    model.eval()
    results = []
    for p in paths:
        probs = model(tf(load_image_file(p).to(device))).float().softmax(-1)[0].cpu()
        values, idx = probs.topk(min(top_k, probs.numel()))
        results.append([(classes[i] if i < len(classes) else str(i), float(v)) for v, i in
                        zip(values.tolist(), idx.tolist())])
    return results
