"""Conformal prediction sets: every class the model cannot rule out at a chosen coverage.

Split conformal with the "least ambiguous" score (Sadinle et al. 2019): a cell's score for a class is
1 - its calibrated probability. On calibration cells the model was not fit on (the out-of-fold cells of
cross-validation, else the model-selection cells), the ceil((n + 1) * coverage)-th smallest score of the
true classes is the threshold; a query cell's set holds every class whose score is at most that. If
query cells are exchangeable with the calibration cells, a set holds the true class with probability
at least ``coverage``.

When every fold model of a k-fold run predicts (``--ensemble all`` or ``folds``), the sets are
cross-conformal (:class:`CrossConformal`): each fold model's scores are ranked among those of its own
held-out cells, the guarantee that holds for models that differ from each other. Otherwise (all_data
alone, or weighted sets) the pooled calibration set serves the predicting model.

Per-class (Mondrian) sets use each class's own calibration cells, so rare types get the coverage too
(over all cells, common types would carry it). A class with fewer than 1 / (1 - coverage) - 1
calibration cells cannot be ruled out at that coverage and is in every set.

A query from another experiment is not exchangeable with the reference: bench/trust.py measures how far
coverage falls on the shifted splits, with and without weighting by a domain classifier (Tibshirani et
al. 2019).

A set always holds the predicted class (see :func:`prediction_sets`): where the model is more accurate than
the coverage asked for, most sets are that class alone and the coverage is above the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CONFORMAL_FILE = "conformal_calibration.safetensors"
# calibration cells the final model embeds for weighted sets: a domain classifier needs a sample, not an atlas
SHIFT_REFERENCE_CELLS = 2000
SET_SEPARATOR = "|"


def _rank(n: int, coverage: float) -> int:
    """ceil((n + 1) * coverage), without float noise pushing an exact integer up (25 * 0.56 = 14.000000000000002)."""
    return math.ceil((n + 1) * coverage - 1e-9)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest of ``scores``; infinite when n is too small for the coverage."""
    n = len(scores)
    rank = _rank(n, coverage)
    if rank > n:
        return math.inf
    return float(np.partition(np.asarray(scores, dtype=np.float64), rank - 1)[rank - 1])


def weighted_conformal_quantile(scores: np.ndarray, weights: np.ndarray, test_weights: np.ndarray,
                                coverage: float) -> np.ndarray:
    """Per test cell, the ``coverage`` quantile of the calibration scores weighted by the likelihood ratio
    w = p(query | x) / p(reference | x), with the test cell's own weight on +infinity (Tibshirani et al. 2019)."""
    order = np.argsort(scores)
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    total = cumulative[-1] if len(cumulative) else 0.0
    # smallest score s with (sum of weights of scores <= s) >= coverage * (total + test weight)
    needed = coverage * (total + np.asarray(test_weights, dtype=np.float64))
    position = np.searchsorted(cumulative, needed - 1e-12 * max(total, 1.0), side="left")
    thresholds = np.full(len(needed), np.inf)
    inside = position < len(sorted_scores)
    thresholds[inside] = sorted_scores[position[inside]]
    return thresholds


@dataclass
class ShiftReference:
    """A random sample of a run's calibration cells (rows into the training cells) with their embedding by
    the run's final model: what a domain classifier compares a query with, for weighted sets."""

    rows: np.ndarray
    embedding: np.ndarray


@dataclass
class ConformalCalibration:
    """The true classes of calibration cells and the calibrated probability the model gave them; ``rows``:
    which of the training cells they are; ``shift``: the final model's sample for weighted sets."""

    codes: np.ndarray              # int, into the model's classes
    true_probability: np.ndarray   # float
    n_classes: int
    rows: Optional[np.ndarray] = None
    shift: Optional[ShiftReference] = None

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, codes: np.ndarray,
                           rows: Optional[np.ndarray] = None) -> "ConformalCalibration":
        codes = np.asarray(codes, dtype=np.int64)
        true = probabilities[np.arange(len(codes)), codes] if len(codes) else np.zeros(0)
        return cls(codes, np.asarray(true, dtype=np.float64), probabilities.shape[1],
                   None if rows is None else np.asarray(rows, dtype=np.int64))

    @classmethod
    def concatenate(cls, parts: Sequence["ConformalCalibration"]) -> "ConformalCalibration":
        sizes = {p.n_classes for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"calibration sets of models with different classes ({sorted(sizes)})")
        rows = None if any(p.rows is None for p in parts) else np.concatenate([p.rows for p in parts])
        return cls(np.concatenate([p.codes for p in parts]), np.concatenate([p.true_probability for p in parts]),
                   sizes.pop(), rows)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def scores(self) -> np.ndarray:
        return 1.0 - self.true_probability

    def subset(self, rows: np.ndarray) -> "ConformalCalibration":
        """The calibration cells that are these training rows, in their order (all must be calibration cells)."""
        if self.rows is None:
            raise ValueError("this calibration does not know its cells' training rows; it cannot be subset")
        order = np.argsort(self.rows)
        take = order[np.searchsorted(self.rows, rows, sorter=order)]
        return ConformalCalibration(self.codes[take], self.true_probability[take], self.n_classes, self.rows[take])

    def thresholds(self, coverage: float, per_class: bool = False) -> np.ndarray:
        """The score threshold of every class: one for all classes, or each class's own (Mondrian)."""
        if not per_class:
            return np.full(self.n_classes, conformal_quantile(self.scores, coverage))
        return np.array([conformal_quantile(self.scores[self.codes == c], coverage) for c in range(self.n_classes)])

    def weighted_thresholds(self, weights: np.ndarray, test_weights: np.ndarray, coverage: float,
                            per_class: bool = False) -> np.ndarray:
        """cells x classes thresholds of weighted conformal: each test cell's own (Tibshirani et al. 2019)."""
        if not per_class:
            column = weighted_conformal_quantile(self.scores, weights, test_weights, coverage)
            return np.repeat(column[:, None], self.n_classes, axis=1)
        return np.stack([weighted_conformal_quantile(self.scores[self.codes == c], weights[self.codes == c],
                                                     test_weights, coverage) for c in range(self.n_classes)], axis=1)

    def too_few(self, coverage: float) -> np.ndarray:
        """Classes with too few calibration cells to be ruled out at ``coverage`` (per-class sets)."""
        counts = np.bincount(self.codes, minlength=self.n_classes)
        return np.array([c for c, n in enumerate(counts) if _rank(int(n), coverage) > n], dtype=np.int64)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CONFORMAL_FILE
        tensors = {"codes": torch.from_numpy(np.ascontiguousarray(self.codes, dtype=np.int64)),
                   "true_probability": torch.from_numpy(np.ascontiguousarray(self.true_probability, dtype=np.float64)),
                   "n_classes": torch.tensor([self.n_classes])}
        if self.rows is not None:
            tensors["rows"] = torch.from_numpy(np.ascontiguousarray(self.rows, dtype=np.int64))
        if self.shift is not None:
            tensors["shift_rows"] = torch.from_numpy(np.ascontiguousarray(self.shift.rows, dtype=np.int64))
            tensors["shift_embedding"] = torch.from_numpy(np.ascontiguousarray(self.shift.embedding, dtype=np.float32))
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, path: Path) -> "ConformalCalibration":
        tensors = load_file(str(path))
        shift = None
        if "shift_rows" in tensors:
            shift = ShiftReference(tensors["shift_rows"].numpy(), tensors["shift_embedding"].numpy())
        return cls(tensors["codes"].numpy(), tensors["true_probability"].numpy(), int(tensors["n_classes"][0]),
                   tensors["rows"].numpy() if "rows" in tensors else None, shift)


@dataclass
class DomainWeights:
    """Likelihood ratios w(x) = p(query | x) / p(reference | x) from a logistic-regression domain classifier on
    the embedding, fit on a sample of calibration cells against a sample of the query. The calibration cells'
    own weights are cross-fitted (each from a classifier fit without it), so that they are not inflated by
    the classifier having seen them."""

    classifier: Any               # a fitted sklearn pipeline
    calibration_weights: np.ndarray

    @classmethod
    def fit(cls, reference_embedding: np.ndarray, query_embedding: np.ndarray, seed: int) -> "DomainWeights":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        X = np.vstack([reference_embedding, query_embedding]).astype(np.float64)
        y = np.r_[np.zeros(len(reference_embedding)), np.ones(len(query_embedding))]
        # strong regularization: a domain classifier that separates the domains perfectly gives weights of
        # 0 and infinity, and sets of every class
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        folds = StratifiedKFold(min(5, int(min(len(reference_embedding), len(query_embedding)))), shuffle=True,
                                random_state=seed)
        held_out = cross_val_predict(classifier, X, y, cv=folds, method="predict_proba")[:, 1]
        classifier.fit(X, y)
        return cls(classifier, _odds(held_out[:len(reference_embedding)]))

    def weights(self, embedding: np.ndarray) -> np.ndarray:
        return _odds(self.classifier.predict_proba(np.asarray(embedding, dtype=np.float64))[:, 1])


def _odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return p / (1 - p)


@dataclass
class CrossConformal:
    """Cross-conformal sets (Vovk 2015) of a k-fold run's fold models: each fold model's score of a query cell
    is ranked among the scores that same model gave its own held-out cells, and the ranks are pooled over the
    folds: a class's p-value is (1 + sum over folds of #{held-out scores >= the cell's score}) / (n + 1), and a
    set holds every class whose p-value exceeds 1 - coverage.

    Pooled split conformal ranks a cell's score by one model (all_data, or the ensemble's average) among
    scores of other models (the folds'): exchangeable only if the models are alike, and fold models of a
    near-perfect classifier differ widely in how close to 1 their probabilities come (on the 10k-gene VDJ split
    one fold model puts 9% of its held-out cells at exactly 1.0, another 69%: bench/results/conformal_holdout.md).
    Ranking each model's scores among its own keeps the comparison within one model. With one fold this is
    split conformal exactly; per class (Mondrian), ranks are among the held-out cells of that class.
    """

    fold_scores: list[np.ndarray]                 # per fold, its held-out cells' scores, sorted
    fold_class_scores: list[list[np.ndarray]]     # per fold, per class, sorted
    n_classes: int

    @classmethod
    def from_folds(cls, parts: Sequence[ConformalCalibration]) -> "CrossConformal":
        sizes = {p.n_classes for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"calibration sets of models with different classes ({sorted(sizes)})")
        n_classes = sizes.pop()
        return cls([np.sort(p.scores) for p in parts],
                   [[np.sort(p.scores[p.codes == c]) for c in range(n_classes)] for p in parts], n_classes)

    def p_values(self, fold_probabilities: Sequence[np.ndarray], per_class: bool = False) -> np.ndarray:
        """cells x classes p-values from each fold model's calibrated probabilities of the same cells (in fold
        order)."""
        if len(fold_probabilities) != len(self.fold_scores):
            raise ValueError(f"{len(fold_probabilities)} fold models' probabilities for {len(self.fold_scores)} folds")
        shape = np.asarray(fold_probabilities[0]).shape
        at_least = np.zeros(shape, dtype=np.float64)
        n = np.zeros(self.n_classes if per_class else 1, dtype=np.float64)
        for k, probabilities in enumerate(fold_probabilities):
            # a hair of tolerance: a score that ties a calibration score counts it (float32 vs float64)
            scores = 1.0 - np.asarray(probabilities, dtype=np.float64) - 1e-9
            if per_class:
                for c, calibration in enumerate(self.fold_class_scores[k]):
                    at_least[:, c] += len(calibration) - np.searchsorted(calibration, scores[:, c], side="left")
                    n[c] += len(calibration)
            else:
                calibration = self.fold_scores[k]
                at_least += len(calibration) - np.searchsorted(calibration, scores, side="left")
                n[0] += len(calibration)
        return (at_least + 1.0) / (n[None, :] + 1.0)

    def sets(self, fold_probabilities: Sequence[np.ndarray], coverage: float, per_class: bool = False) -> np.ndarray:
        """cells x classes, True where a class's p-value exceeds 1 - coverage (sets may be empty)."""
        return self.p_values(fold_probabilities, per_class) > 1.0 - coverage + 1e-12


def with_predicted_class(sets: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The sets with each cell's predicted class added (in place; returned)."""
    if len(sets):
        sets[np.arange(len(sets)), probabilities.argmax(axis=1)] = True
    return sets


def prediction_sets(probabilities: np.ndarray, thresholds: np.ndarray, *, with_top_class: bool = True) -> np.ndarray:
    """cells x classes, True where the class is in the cell's set: its score 1 - p is at most the threshold
    (one per class, or one per cell and class: weighted conformal), and, unless ``with_top_class`` is off, the
    predicted class, so that no set is empty.

    Sets holding the predicted class keep the guarantee (they are supersets) and keep a set from contradicting
    the call: without it, a model more accurate than the coverage asked for leaves its surest cells with empty
    sets, and models of one run that differ in how sure they are (fold models whose temperatures differ) give
    confident, correct cells empty sets by the thousand (bench/results/trust.md)."""
    # a hair of tolerance: a probability that ties the threshold's own score stays in (float32 vs float64)
    sets = (1.0 - probabilities.astype(np.float64)) <= thresholds + 1e-9
    return with_predicted_class(sets, probabilities) if with_top_class else sets


def set_labels(sets: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Each cell's set as text: its classes joined by '|' (in class order; '' for an empty set). One string per
    distinct set, shared by its cells (a block holds few distinct sets: no text made per cell)."""
    names = np.asarray(classes, dtype=object)
    sets = np.asarray(sets, dtype=bool).reshape(len(sets), len(names))
    distinct, cell_set = np.unique(np.packbits(sets, axis=1), axis=0, return_inverse=True)
    members = np.unpackbits(distinct, axis=1, count=len(names)).astype(bool)
    texts = np.empty(len(distinct), dtype=object)
    texts[:] = [SET_SEPARATOR.join(names[row]) for row in members]
    return texts[np.asarray(cell_set).reshape(-1)]


def true_class_in_set(sets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Whether each cell's set holds its true class (``codes``: into the classes; -1, a class the model does
    not know: never)."""
    codes = np.asarray(codes)
    return (codes >= 0) & sets[np.arange(len(codes)), np.maximum(codes, 0)]


def coverage_summary(sets: np.ndarray, codes: np.ndarray, n_classes: int) -> dict:
    """Coverage and mean set size of cells with known true classes (codes into the classes), with the class
    covered least."""
    covered, size = true_class_in_set(sets, codes), sets.sum(axis=1)
    per_class = [covered[codes == c].mean() for c in range(n_classes) if (codes == c).any()]
    return {"coverage": float(covered.mean()), "mean_set_size": float(size.mean()),
            "lowest_class_coverage": float(min(per_class)) if per_class else float("nan")}


def held_out_fold_sets(probabilities: np.ndarray, codes: np.ndarray, folds: np.ndarray, coverage: float,
                       per_class: bool = False, with_top_class: bool = True) -> np.ndarray:
    """Sets of out-of-fold predictions, each fold's calibrated on the other folds' cells: cross-validation's
    measure of the coverage of pooled split conformal (one model's scores among other models'). The
    cross-conformal sets of a full ensemble (:class:`CrossConformal`) cannot be measured so: every other fold
    model was fit on a fold's held-out cells (bench/conformal_holdout.py holds cells out of every model)."""
    sets = np.zeros(probabilities.shape, dtype=bool)
    for fold in np.unique(folds):
        inside = folds == fold
        calibration = ConformalCalibration.from_probabilities(probabilities[~inside], codes[~inside])
        sets[inside] = prediction_sets(probabilities[inside], calibration.thresholds(coverage, per_class),
                                       with_top_class=with_top_class)
    return sets

