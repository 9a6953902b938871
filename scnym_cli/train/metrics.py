"""Classification metrics: accuracy, balanced accuracy, macro-F1, per-class precision / recall / F1, expected
calibration error.

The label metrics come from one table of counts (true label x predicted label) built from integer codes:
labels are never turned into fixed-width text, which for 5 million cells took 0.3 GB per array. The
figures are scikit-learn's (accuracy_score, balanced_accuracy_score, f1_score(average="macro") over the
true labels, precision_recall_fscore_support with zero_division=0; tests compare them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd


@dataclass
class LabelCounts:
    """Cells per (true label, predicted label) over one vocabulary of label names: ``first`` (e.g. the model's
    classes) in their order, then the other true labels, then the other predicted labels, each sorted."""

    names: list[str]
    counts: np.ndarray          # names x names, int64

    @classmethod
    def of(cls, truth, predicted, first: Sequence = ()) -> "LabelCounts":
        return cls.of_codes(*coded_labels(truth, predicted, first))

    @classmethod
    def of_codes(cls, truth: np.ndarray, predicted: np.ndarray, names: list[str]) -> "LabelCounts":
        n = len(names)
        return cls(names, np.bincount(truth * n + predicted, minlength=n * n).reshape(n, n))

    @property
    def support(self) -> np.ndarray:
        return self.counts.sum(axis=1)

    @property
    def called(self) -> np.ndarray:
        return self.counts.sum(axis=0)

    def precision_recall_f1(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per name; 0 where a ratio has no cells (scikit-learn's zero_division=0)."""
        hits = np.diag(self.counts).astype(float)
        support, called = self.support, self.called
        precision = np.divide(hits, called, out=np.zeros_like(hits), where=called > 0)
        recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
        both = support + called
        f1 = np.divide(2 * hits, both, out=np.zeros_like(hits), where=both > 0)
        return precision, recall, f1


def coded_labels(truth, predicted, first: Sequence = ()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(true codes, predicted codes, names): both label arrays as positions in one vocabulary, ``first`` in
    its order, then the other true labels, then the other predicted labels, each sorted (see LabelCounts)."""
    truth_codes, names = codes_in(truth, [str(c) for c in first])
    predicted_codes, names = codes_in(predicted, names)
    return truth_codes, predicted_codes, names


def codes_in(labels, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each label's position in ``names``, and ``names`` followed by the labels it lacked (sorted)."""
    codes, found = _codes(labels)
    names = list(names)
    names += sorted(set(found) - set(names))
    position = {name: i for i, name in enumerate(names)}
    return np.asarray([position[n] for n in found], dtype=np.int64)[codes], names


def _codes(labels) -> tuple[np.ndarray, list[str]]:
    """Integer codes of the labels and the name (str) of each code; names that read the same share one."""
    values = labels if isinstance(labels, np.ndarray) and labels.dtype.kind in "iub" else np.asarray(labels, dtype=object)
    codes, uniques = pd.factorize(values, use_na_sentinel=False)   # a missing label is the name "nan"
    names = [str(u) for u in uniques]
    merged = sorted(set(names))
    if len(merged) == len(names):
        return codes, names
    position = {name: i for i, name in enumerate(merged)}   # e.g. 1 and "1": one label, as str() sees them
    return np.asarray([position[n] for n in names], dtype=np.int64)[codes], merged


def classification_metrics(truth, predicted) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the true labels present) and macro-F1 (over the true
    labels present)."""
    return summary_metrics(LabelCounts.of(truth, predicted))


def summary_metrics(table: LabelCounts) -> dict[str, float]:
    """:func:`classification_metrics` of a table of counts."""
    if table.counts.sum() == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
    _, recall, f1 = table.precision_recall_f1()
    present = table.support > 0
    return {"accuracy": float(np.trace(table.counts) / table.counts.sum()),
            "balanced_accuracy": float(recall[present].mean()),
            "macro_f1": float(f1[present].mean())}


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, n_bins: int = 15) -> float:
    """ECE of class probabilities (cells x classes) against true class codes."""
    if len(truth) == 0:
        return float("nan")
    return calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == truth, n_bins)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by bin size."""
    return calibration_error_of(confidence_bins(confidence, correct, n_bins))


def confidence_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """Per equal-width confidence bin: cells, their summed confidence, their correct calls (3 x n_bins). Sums of
    blocks of cells add up to the sums of all of them (a streamed query is scored block by block)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    return np.stack([np.bincount(bins, minlength=n_bins).astype(np.float64),
                     np.bincount(bins, weights=confidence, minlength=n_bins),
                     np.bincount(bins, weights=np.asarray(correct, dtype=np.float64), minlength=n_bins)])


def calibration_error_of(bins: np.ndarray) -> float:
    """The ECE of :func:`confidence_bins`' sums."""
    n_cells = bins[0].sum()
    return float(np.abs(bins[2] - bins[1]).sum() / n_cells) if n_cells else float("nan")


def calibration_error_floor(bins: np.ndarray, draws: int = 1000, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would show on this many cells at these confidences (median over
    ``draws`` simulated label draws, each bin's correct calls ~ Binomial(cells, mean confidence)).

    ECE over a few hundred cells is biased upwards by sampling alone (about 0.02 at 300 cells with most
    confidences near 0.95): a figure near its floor says nothing about miscalibration, one well above it does.
    The draws use their own seeded generator (no global random state is touched)."""
    cells, confidence_sum = bins[0], bins[1]
    n_cells = cells.sum()
    if not n_cells:
        return float("nan")
    filled = cells > 0
    mean_confidence = np.clip(confidence_sum[filled] / cells[filled], 0.0, 1.0)
    correct = np.random.default_rng(seed).binomial(cells[filled].astype(np.int64), mean_confidence,
                                                   size=(draws, int(filled.sum())))
    return float(np.median(np.abs(correct - confidence_sum[filled]).sum(axis=1) / n_cells))


def per_class_metrics(truth, predicted, classes) -> pd.DataFrame:
    """One row per class, the model's and any other true label: support (true cells), predicted (cells
    called it), precision, recall, F1; ``in_reference`` says whether the model knows the class (a class it
    does not know cannot be recalled: its cells count as errors)."""
    return per_class_table(LabelCounts.of(truth, predicted, classes), len(classes))


def per_class_table(table: LabelCounts, n_classes: int) -> pd.DataFrame:
    """:func:`per_class_metrics` of a table whose first ``n_classes`` names are the model's classes."""
    rows = n_classes + int(((table.support > 0) & (np.arange(len(table.names)) >= n_classes)).sum())
    precision, recall, f1 = table.precision_recall_f1()
    return pd.DataFrame({"class": table.names[:rows], "in_reference": np.arange(rows) < n_classes,
                         "support": table.support[:rows].astype(int), "predicted": table.called[:rows].astype(int),
                         "precision": precision[:rows], "recall": recall[:rows], "f1": f1[:rows]})


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Cells per equal-width confidence bin, their mean confidence and their accuracy (a reliability diagram's
    points; a calibrated model has accuracy = confidence in every bin)."""
    return reliability_table_of(confidence_bins(confidence, correct, n_bins))


def reliability_table_of(bins: np.ndarray) -> pd.DataFrame:
    """:func:`reliability_table` of :func:`confidence_bins`' sums."""
    n_bins = bins.shape[1]
    n = bins[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"bin_low": np.arange(n_bins) / n_bins, "bin_high": np.arange(1, n_bins + 1) / n_bins,
                             "n_cells": n.astype(int), "mean_confidence": np.where(n > 0, bins[1] / n, np.nan),
                             "accuracy": np.where(n > 0, bins[2] / n, np.nan)})
