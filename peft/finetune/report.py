"""The report files of an evaluated split: confusion matrix, per-class report, ROC curves, training history."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from loaders.atomic import atomic_write

from . import plots
from .metrics import confusion_matrix, normalize_rows, one_vs_rest_roc, precision_recall_f1


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
    plots.plot_confusion(cm_norm, classes, out / f"{prefix}_confusion.png", f"{prefix}: accuracy {accuracy:.4f}")

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
    plots.plot_roc(curves, classes, out / f"{prefix}_roc.png")
    if history:
        write_history_csv(history, out / "history.csv")
        plots.plot_curves(history, out / "curves.png")
    return summary


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
