"""Classification metrics: accuracy, balanced accuracy, macro-F1, expected calibration error."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support


def classification_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall over the classes present) and macro-F1."""
    if len(truth) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
    with warnings.catch_warnings():
        # classes predicted but absent from `truth` are expected in cross-domain data
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(truth, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", labels=np.unique(truth))),
        }


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> float:
    """ECE of class probabilities (cells x classes) against true class codes."""
    if len(truth) == 0:
        return float("nan")
    return calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == truth, n_bins)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size."""
    if len(confidence) == 0:
        return float("nan")
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.sum() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total / len(confidence))


def per_class_metrics(truth: np.ndarray, predicted: np.ndarray, classes) -> pd.DataFrame:
    """One row per class, the model's and any other true label: support (true cells), predicted (cells
    called it), precision, recall, F1; ``in_reference`` says whether the model knows the class (a class it
    does not know cannot be recalled: its cells count as errors)."""
    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    known = [str(c) for c in classes]
    labels = known + sorted(set(truth) - set(known))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # precision of a class never predicted is 0, not an error
        precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels,
                                                                         zero_division=0)
    called = pd.Series(predicted).value_counts()
    return pd.DataFrame({"class": labels, "in_reference": [c in set(known) for c in labels],
                         "support": support.astype(int),
                         "predicted": [int(called.get(c, 0)) for c in labels],
                         "precision": precision, "recall": recall, "f1": f1})


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Cells per equal-width confidence bin, their mean confidence and their accuracy (a reliability diagram's
    points; a calibrated model has accuracy = confidence in every bin)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        in_bin = bins == b
        n = int(in_bin.sum())
        rows.append({"bin_low": b / n_bins, "bin_high": (b + 1) / n_bins, "n_cells": n,
                     "mean_confidence": float(confidence[in_bin].mean()) if n else float("nan"),
                     "accuracy": float(correct[in_bin].mean()) if n else float("nan")})
    return pd.DataFrame(rows)
