"""Seeded, stratified splits: cross-validation folds and the model-selection split."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Row indices of one training run.

    ``fit`` trains the weights, ``select`` chooses the best epoch, ``held_out`` is only predicted, for the
    fold's evaluation; the temperature is fitted on both (every labeled cell the weights never saw).
    """

    fit: np.ndarray
    select: np.ndarray
    held_out: np.ndarray


def selection_split(indices: np.ndarray, codes: np.ndarray, fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of each class (at least one cell of classes with 2+ cells)."""
    rng = np.random.default_rng(seed)
    select = []
    for code in np.unique(codes[indices]):
        members = indices[codes[indices] == code]
        if len(members) < 2:
            continue
        n = int(min(max(round(fraction * len(members)), 1), len(members) - 1))
        select.append(rng.choice(members, size=n, replace=False))
    chosen = np.sort(np.concatenate(select)) if select else np.array([], dtype=np.int64)
    fit = np.setdiff1d(indices, chosen, assume_unique=False)
    return fit.astype(np.int64), chosen.astype(np.int64)


def cross_validation_splits(labeled: np.ndarray, codes: np.ndarray, n_folds: int, val_fraction: float,
                            seed: int) -> list[Split]:
    """Stratified k-fold over the labeled rows; each training part gets its own selection split."""
    counts = np.bincount(codes[labeled])
    if counts[counts > 0].min() < n_folds:
        log.warning("some classes have fewer cells (%d) than folds (%d); those folds lack them",
                    int(counts[counts > 0].min()), n_folds)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported above in our own words
        for k, (train_part, held_out) in enumerate(folds.split(labeled, codes[labeled])):
            fit, select = selection_split(labeled[train_part], codes, val_fraction, seed + 1 + k)
            splits.append(Split(fit, select, np.sort(labeled[held_out])))
    return splits


def all_data_split(labeled: np.ndarray, codes: np.ndarray, val_fraction: float, seed: int) -> Split:
    """The final model: every labeled cell but the selection split is used for fitting."""
    fit, select = selection_split(labeled, codes, val_fraction, seed)
    return Split(fit, select, np.array([], dtype=np.int64))
