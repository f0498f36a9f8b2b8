"""Classification metrics computed with numpy (no scikit-learn): confusion matrix, per-class precision/recall/F1,
one-vs-rest ROC curves and AUC.

ROC: sort scores descending, move the threshold past one *distinct* score at a time (tied scores move together,
so ties give a diagonal segment, the usual convention), and integrate TPR over FPR with the trapezoid rule.
"""

from __future__ import annotations

import numpy as np


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
