"""Per-cell labels and groups: from a metadata CSV or from the file's own obs / column attributes."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..errors import ScnymError
from .readers import CellMatrix

log = logging.getLogger(__name__)

UNLABELED = "Unlabeled"

# one string per cell: a list, or a numpy / pandas array of them
Labels = Union[Sequence[str], np.ndarray]
UNKNOWN = "Unknown"


def attach_metadata(cells: CellMatrix, metadata_path: Path) -> CellMatrix:
    """Join a metadata CSV onto the cells (see :func:`join_metadata`)."""
    return cells.with_(obs=join_metadata(cells.obs, metadata_path, cells.source))


def join_metadata(obs: pd.DataFrame, metadata_path: Path, source: str) -> pd.DataFrame:
    """A metadata CSV joined to ``obs``: by a column of cell ids when one matches, else by row order.

    Columns of the CSV replace obs columns of the same name.
    """
    try:
        metadata = pd.read_csv(metadata_path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ScnymError(f"could not read --training_metadata {metadata_path} ({str(e).splitlines()[0]})") from None
    ids = obs.index
    id_column = next((c for c in metadata.columns
                      if metadata[c].notna().all() and pd.Index(ids).isin(metadata[c]).all()
                      and not metadata[c].duplicated().any()), None)
    if id_column is not None and not ids.has_duplicates:
        matched = metadata.set_index(id_column).reindex(ids)
        log.info("--training_metadata: matched %d cells by the id column %r", len(ids), id_column)
    elif len(metadata) == len(obs):
        matched = metadata.set_axis(ids, axis=0)
        log.info("--training_metadata: rows taken in cell order (no column matches the cell ids)")
    else:
        raise ScnymError(
            f"--training_metadata has {len(metadata)} rows but {source} has {len(obs)} cells and no "
            "column of the CSV holds every cell id; give one row per cell in cell order, or a cell-id column")
    matched = matched.drop(columns=[c for c in matched.columns if str(c).startswith("Unnamed:")])
    kept = obs.drop(columns=[c for c in matched.columns if c in obs.columns])
    return pd.concat([kept, matched], axis=1)


def require_column(obs: pd.DataFrame, column: str, option: str, source: str) -> pd.Series:
    """obs[column], or a one-line error that lists the columns and suggests the closest."""
    if column not in obs.columns:
        close = difflib.get_close_matches(column, [str(c) for c in obs.columns], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        available = ", ".join(map(str, obs.columns[:20])) or "none"
        raise ScnymError(f"{option} column {column!r} is not in the metadata of {source}{hint}; "
                         f"available columns: {available}")
    return obs[column]


def per_cell_strings(values: pd.Series, strip: bool = True) -> np.ndarray:
    """A metadata column as strings (stripped, unless ``strip`` is off): an object array in which equal values
    share one ``str``.

    Each distinct value is converted once: 8 bytes a cell, where a string per cell (``astype(str)``) took
    ~60 bytes a cell and numpy's fixed-width text 4 bytes a character -- hundreds of MB on atlases.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    names = np.empty(len(uniques), dtype=object)
    names[:] = [str(u).strip() if strip else str(u) for u in uniques]
    return names[codes]


def missing_values(values: pd.Series) -> np.ndarray:
    """True where a metadata value is missing: NA, or empty / only spaces (each distinct value looked at once)."""
    codes, uniques = pd.factorize(values)   # NA: code -1, the last entry of ``blank``
    blank = np.array([str(u).strip() == "" for u in uniques] + [True], dtype=bool)
    return blank[codes]


def require_values(values: pd.Series, column: str, option: str, source: str, fix: str,
                   where: Optional[np.ndarray] = None) -> None:
    """A one-line error when cells (those ``where`` is True for, default all) have no value in the column."""
    missing = missing_values(values)
    if where is not None:
        missing &= where
    if missing.any():
        raise ScnymError(f"{int(missing.sum())} cells have no value in {option} column {column!r} of {source}; {fix}")


def read_labels(cells: CellMatrix, column: str, option: str = "--lower_group") -> np.ndarray:
    """Labels of ``cells`` (see :func:`labels_from_obs`)."""
    return labels_from_obs(cells.obs, column, option, cells.source)


def labels_from_obs(obs: pd.DataFrame, column: str, option: str, source: str) -> np.ndarray:
    """Labels as strings; missing values are an error (mark target cells 'Unlabeled' instead)."""
    series = require_column(obs, column, option, source)
    require_values(series, column, option, source,
                   f"label them {UNLABELED!r} to use them as unlabeled target data, or remove them")
    return per_cell_strings(series)


@dataclass(frozen=True)
class LabelEncoding:
    """Class names <-> integer codes, in a stable (sorted) order."""

    classes: tuple[str, ...]

    @classmethod
    def fit(cls, labels: Labels, column: str = "labels") -> "LabelEncoding":
        classes = tuple(sorted(set(map(str, labels)) - {UNLABELED}))
        if not classes:
            raise ScnymError(f"every cell is {UNLABELED!r} in column {column!r}: training needs labeled reference "
                             "cells of at least 2 classes")
        if len(classes) < 2:
            raise ScnymError(f"training needs at least 2 classes in column {column!r}; found only {classes[0]!r}")
        if UNKNOWN in classes:
            raise ScnymError(f"{UNKNOWN!r} is reserved for low-confidence predictions; rename that class in {column!r}")
        return cls(classes)

    def encode(self, labels: Labels) -> np.ndarray:
        """Integer codes; cells labelled 'Unlabeled' (or unknown classes) get -1. Each distinct label is looked
        up once (no per-cell string copies)."""
        cells, uniques = pd.factorize(np.asarray(labels, dtype=object), use_na_sentinel=False)
        per_unique = pd.Index(self.classes).get_indexer(pd.Index([str(u) for u in uniques], dtype=object))
        return np.asarray(per_unique, dtype=np.int64)[cells]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[codes]


def read_groups(obs: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """The upper group of every cell as strings; a missing column or missing values are errors."""
    values = require_column(obs, column, "--upper_group", source)
    require_values(values, column, "--upper_group", source,
                   "give every cell a group (target cells from --unlabeled_counts too)")
    return per_cell_strings(values, strip=False)


def one_hot(groups: np.ndarray, categories: tuple[str, ...], value: float = 1.0) -> np.ndarray:
    """float32 one-hot (the hot entry is ``value``); groups not in ``categories`` get an all-zero row."""
    positions = pd.Index(categories).get_indexer(groups)
    encoded = np.zeros((len(groups), len(categories)), dtype=np.float32)
    known = positions >= 0
    encoded[np.flatnonzero(known), positions[known]] = value
    return encoded
