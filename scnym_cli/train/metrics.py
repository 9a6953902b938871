"""Classification metrics: accuracy, balanced accuracy, macro-F1, expected calibration error."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


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
