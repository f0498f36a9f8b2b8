"""The report files of an evaluated split: confusion matrix, per-class report, ROC curves, training history."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders.atomic import atomic_write

from . import plots
from .metrics import confusion_matrix, normalize_rows, one_vs_rest_roc, precision_recall_f1

log = logging.getLogger(__name__)


def write_json(obj, path: Path) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def write_text(text: str, path: Path) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_history_csv(history: list[dict], path: Path) -> None:
    """One row per epoch; columns from the union of the keys, in first-seen order."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)



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


@dataclass
class Evaluation:
    """The numbers of an evaluated split, written; the figures drawn from them come after."""

    summary: dict  # accuracy, macro precision/recall/F1, mean AUC, number of samples
    cm: np.ndarray  # (K, K) confusion counts, rows true
    curves: list  # one-vs-rest ROC per class


def write_evaluation_report(out_dir: str | os.PathLike, probs, labels, classes: list[str],
                            history: list[dict] | None = None, prefix: str = "test") -> dict:
    """Write every evaluation artefact for one split (:func:`write_evaluation_numbers`, then
    :func:`write_figures`); returns the summary (accuracy, macro F1, mean AUC)."""
    ev = write_evaluation_numbers(out_dir, probs, labels, classes, history, prefix)
    write_figures(Path(out_dir), ev, classes, history, prefix)
    return ev.summary


def write_evaluation_numbers(out_dir: str | os.PathLike, probs, labels, classes: list[str],
                             history: list[dict] | None = None, prefix: str = "test") -> Evaluation:
    """{prefix}_confusion.csv (counts), {prefix}_top_confusions.csv, {prefix}_report.txt/.json/.csv, and with a
    history history.csv: every number, before any figure, so a figure can never lose them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    k = len(classes)
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, k)
    with atomic_write(out / f"{prefix}_confusion.csv", "w") as f:
        np.savetxt(f, cm, fmt="%d", delimiter=",", header=",".join(classes))
    write_top_confusions(cm, classes, out / f"{prefix}_top_confusions.csv")
    accuracy = float((preds == labels).mean()) if labels.size else 0.0
    report = precision_recall_f1(cm)
    report["accuracy"] = accuracy
    curves = one_vs_rest_roc(probs, labels, k)
    aucs = [c["auc"] for c in curves]
    write_text(classification_report_text(report, classes), out / f"{prefix}_report.txt")
    per_class = [{"class": name, "precision": float(report["precision"][i]), "recall": float(report["recall"][i]),
                  "f1": float(report["f1"][i]), "support": int(report["support"][i]), "auc": aucs[i]}
                 for i, name in enumerate(classes)]
    valid = [a for a in aucs if a is not None]
    summary = {"accuracy": accuracy, "macro_precision": float(report["precision"].mean()),
               "macro_recall": float(report["recall"].mean()), "macro_f1": float(report["f1"].mean()),
               "mean_auc": float(np.mean(valid)) if valid else None, "num_samples": int(labels.size)}
    write_json({"summary": summary, "classes": per_class}, out / f"{prefix}_report.json")
    with atomic_write(out / f"{prefix}_report.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(per_class[0]))
        w.writeheader()
        w.writerows(per_class)
    if history:
        write_history_csv(history, out / "history.csv")
    return Evaluation(summary, cm, curves)


def write_top_confusions(cm: np.ndarray, classes: list[str], path: Path, n: int = 50) -> None:
    """The ``n`` largest off-diagonal counts of a confusion matrix: true class, predicted class, count, share of
    the true class (what a figure of many classes cannot show cell by cell)."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    rows = [(int(i), int(j)) for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j] > 0]
    support = cm.sum(1)
    with atomic_write(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["true", "predicted", "count", "share_of_true"])
        w.writerows([classes[i], classes[j], int(cm[i, j]), f"{cm[i, j] / support[i]:.4f}"] for i, j in rows)


def write_figures(out: Path, ev: Evaluation, classes: list[str], history: list[dict] | None, prefix: str) -> None:
    """{prefix}_confusion.png, {prefix}_roc.png and, with a history, curves.png. A figure that cannot be drawn
    (out of memory, a backend error) is named in one warning and the others are still drawn: the numbers are
    already on disk."""
    title = f"{prefix}: accuracy {ev.summary['accuracy']:.4f}"
    jobs = [(f"{prefix}_confusion.png", lambda p: plots.plot_confusion(normalize_rows(ev.cm), classes, p, title)),
            (f"{prefix}_roc.png", lambda p: plots.plot_roc(ev.curves, classes, p))]
    if history:
        jobs.append(("curves.png", lambda p: plots.plot_curves(history, p)))
    for name, draw in jobs:
        try:
            draw(out / name)
        except (MemoryError, RuntimeError, ValueError) as e:
            log.warning("%s: figure not drawn (%s: %s); the numbers are in the .csv/.json files beside it",
                        out / name, type(e).__name__, e)


def write_predictions_csv(path: Path, files: list[str], probs, labels, classes: list[str]) -> None:
    """One row per evaluated image, in evaluation order: its file, true class, predicted class, that probability.
    A name that is not valid UTF-8 (a non-UTF-8 file name read as surrogates) is written with backslash escapes."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    preds = probs.argmax(axis=1)
    text = io.StringIO(newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["file", "class", "predicted", "probability"])
    w.writerows([name, classes[t], classes[p], f"{probs[i, p]:.6f}"]
                for i, (name, t, p) in enumerate(zip(files, labels, preds)))
    with atomic_write(path) as f:
        f.write(text.getvalue().encode("utf-8", "backslashreplace"))
