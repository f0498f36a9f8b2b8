"""Figures of a run's evaluation: training curves, normalised confusion matrix, one-vs-rest ROC curves.

Built as matplotlib Figures without pyplot (no global state, any backend) and written with ``savefig``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss (train/val) and accuracy (train/val) against epoch."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    ax_l, ax_a = fig.subplots(1, 2)
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


LABELLED_CLASSES = 30  # up to this many classes a confusion figure names its rows and prints each cell
MAX_INCHES = 12.0  # its side at most (1,440 px at 120 dpi), whatever the number of classes


def plot_confusion(cm_norm: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    """The row-normalised confusion matrix as an image. Up to LABELLED_CLASSES classes every cell is printed;
    past that it is a heat map without labels, of bounded size (the largest confusions are in
    <split>_top_confusions.csv)."""
    k = len(classes)
    # Half an inch per class while cells are few; beyond, the matrix is a picture and stays MAX_INCHES (1440 px):
    # at 0.5 in per class, 120 classes drew a 7440 px square, 55 Mpx to encode.
    size = min(MAX_INCHES, max(4.0, 0.5 * k + 2))
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(cm_norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if k <= LABELLED_CLASSES:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                v = cm_norm[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted" if k <= LABELLED_CLASSES else f"predicted (class index; {k} classes)")
    ax.set_ylabel("true (rows sum to 1)")
    ax.set_title(title or "normalised confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_roc(curves: list[dict], classes: list[str], path: Path) -> None:
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
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
