"""Evaluation metrics against hand computations and an independent pairwise AUC; report files are sane."""

import itertools
import json

import numpy as np
import pytest

from peft.finetune import metrics
from peft.finetune import report as report_files


def pairwise_auc(scores, positive):
    """AUC as P(score of a random positive > score of a random negative) + 0.5 P(tie) (Mann-Whitney)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_perfect_and_reversed_scores_give_auc_one_and_zero():
    positive = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    scores = np.where(positive, 0.9, 0.1) + np.arange(6) * 0.01  # every positive above every negative
    fpr, tpr, _ = metrics.roc_curve(scores, positive)
    assert metrics.auc(fpr, tpr) == 1.0
    fpr, tpr, _ = metrics.roc_curve(-scores, positive)
    assert metrics.auc(fpr, tpr) == 0.0


def test_roc_points_of_a_hand_worked_example():
    # scores sorted: 0.9(P) 0.8(N) 0.7(P) 0.6(N); thresholds pass one score at a time.
    fpr, tpr, thr = metrics.roc_curve([0.7, 0.9, 0.6, 0.8], [1, 1, 0, 0])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.7, 0.6])
    assert metrics.auc(fpr, tpr) == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered correctly


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pairwise_probability_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40) / 5.0  # many ties
    positive = rng.random(40) < 0.4
    fpr, tpr, _ = metrics.roc_curve(scores, positive)
    assert 0 <= metrics.auc(fpr, tpr) <= 1
    assert metrics.auc(fpr, tpr) == pytest.approx(pairwise_auc(scores, positive), abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and fpr[-1] == tpr[-1] == 1


def test_roc_needs_both_classes():
    with pytest.raises(ValueError, match="positives and negatives"):
        metrics.roc_curve([0.1, 0.2], [1, 1])


def test_confusion_precision_recall_f1_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    cm = metrics.confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    r = metrics.precision_recall_f1(cm)
    # class 0: tp 2, predicted 2, actual 3; class 1: tp 1, predicted 2, actual 2; class 2: tp 1, pred 2, actual 1
    np.testing.assert_allclose(r["precision"], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(r["recall"], [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(r["f1"], [0.8, 0.5, 2 / 3])
    np.testing.assert_array_equal(r["support"], [3, 2, 1])
    norm = metrics.normalize_rows(cm)
    np.testing.assert_allclose(norm.sum(axis=1), 1.0)
    np.testing.assert_allclose(norm[0], [2 / 3, 1 / 3, 0])


def test_absent_class_gives_zero_row_not_nan():
    cm = metrics.confusion_matrix([0, 0, 1], [0, 1, 1], 3)
    norm = metrics.normalize_rows(cm)
    assert np.isfinite(norm).all() and norm[2].sum() == 0
    r = metrics.precision_recall_f1(cm)
    assert np.isfinite(r["f1"]).all()


def test_report_files_are_written_and_consistent(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200)
    logits = rng.normal(size=(200, 4)) + 2.0 * np.eye(4)[labels]  # informative but imperfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = ["a", "b", "c", "d"]
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.5, "val_accuracy": 0.4},
               {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "train_accuracy": 0.6, "val_accuracy": 0.5}]
    summary = report_files.write_evaluation_report(tmp_path, probs, labels, classes, history, prefix="test")
    for name in ("test_confusion.png", "test_confusion.csv", "test_report.txt", "test_report.json",
                 "test_report.csv", "test_roc.png", "history.csv", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert summary["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    report = json.loads((tmp_path / "test_report.json").read_text())
    for i, row in enumerate(report["classes"]):
        assert 0.5 < row["auc"] <= 1
        assert row["auc"] == pytest.approx(pairwise_auc(probs[:, i], labels == i), abs=1e-12)
        assert row["support"] == int((labels == i).sum())
    cm = np.loadtxt(tmp_path / "test_confusion.csv", delimiter=",", skiprows=1)
    assert cm.sum() == 200
    np.testing.assert_allclose(metrics.normalize_rows(cm).sum(1), 1.0)


def test_predictions_csv_names_every_image_even_awkward_names(tmp_path):
    """One row per image in order; a comma or a newline in a name survives csv quoting, a name that is not UTF-8
    (surrogates, as os.fsdecode gives) is written with backslash escapes instead of failing the evaluation."""
    import csv

    names = ["a,b.png", "new\nline.png", "caf\udce9.png"]
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.45, 0.55]])
    report_files.write_predictions_csv(tmp_path / "p.csv", names, probs, np.array([0, 0, 1]), ["cat", "dog"])
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["file", "class", "predicted", "probability"], ["a,b.png", "cat", "cat", "0.700000"],
                    ["new\nline.png", "cat", "dog", "0.800000"], ["caf\\udce9.png", "dog", "dog", "0.550000"]]


def test_top_confusions_lists_the_largest_off_diagonal_counts_with_the_true_class_share(tmp_path):
    """Rows by decreasing count, only confusions that happened (count > 0), the share of the TRUE class's images;
    re-computed here from the matrix by brute force."""
    cm = np.array([[5, 3, 0, 1],   # true a: 9 images
                   [0, 2, 0, 0],   # true b: never confused
                   [4, 1, 6, 0],   # true c: 11 images
                   [0, 0, 2, 1]])  # true d: 3 images
    classes = ["a", "b", "c", "d"]
    path = tmp_path / "top.csv"
    report_files.write_top_confusions(cm, classes, path, n=10)
    lines = path.read_text().splitlines()
    assert lines[0] == "true,predicted,count,share_of_true"
    expected = sorted(((cm[i, j], i, j) for i in range(4) for j in range(4) if i != j and cm[i, j] > 0),
                      key=lambda t: -t[0])
    rows = [line.split(",") for line in lines[1:]]
    assert [(int(c), classes.index(t), classes.index(p)) for t, p, c, _ in rows] == expected  # 4, 3, 2, 1, 1
    for t, p, c, share in rows:
        i = classes.index(t)
        assert float(share) == pytest.approx(int(c) / cm[i].sum(), abs=5e-5)
    report_files.write_top_confusions(cm, classes, path, n=2)
    assert [line.split(",")[:3] for line in path.read_text().splitlines()[1:]] == [["c", "a", "4"], ["a", "b", "3"]]
