"""Check and bring expression to the model's scale: ln(CPM + 1).

Raw integer counts are normalized; log-normalized input at any per-cell target sum
(CP10k, CPM, ...) and log base (e, 2, 10; detected when the cells' totals allow it) is rescaled
to CPM; negative (scaled), NaN/infinite and linear
(CPM/TPM without the log) values are refused with a message that says what to pass instead.
All work is on the CSR ``data`` array, row block by row block, so memory stays bounded.

One policy wherever data come from (a file read whole, a file trained on from disk, a query streamed in
chunks): the kind of a dataset is decided on its first DETECTION_ROWS cells and applied to every cell; every
value is checked (NaN, infinite, negative), and data found to be counts must be integers throughout (a file
whose later cells are not is refused, not silently normalized as counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, cast

import numpy as np
import scipy.sparse as sp

from ..errors import ScnymError

log = logging.getLogger(__name__)

TARGET_SUM = 1e6
# ln(1e8 + 1) ~ 18.4: log-normalized values above this are implausible for any target sum.
MAX_LOG_VALUE = 20.0
VALUE_BLOCK = 1 << 24
# values per step of the per-block integer check (its temporaries stay in the CPU's cache)
SCAN_VALUES = 1 << 16

Kind = Literal["counts", "log1p", "log2_1p", "log10_1p"]
BASES = {"log1p": np.e, "log2_1p": 2.0, "log10_1p": 10.0}
# rows whose de-logged values sum to the same total within this relative spread were normalized
# over exactly these genes with that log base
CONSTANT_SUM_SPREAD = 1e-3
# the cells a dataset's kind is decided on (the first ones, however the dataset is read)
DETECTION_ROWS = 8192
# of which this many are enough to tell the log base
BASE_ROWS = 2000
# the largest ln(CPM + 1): a cell whose counts all fall on one gene
AS_IS_MAX = float(np.log1p(TARGET_SUM)) + 1e-3


def check_values(X: sp.csr_matrix, source: str = "input") -> None:
    """Refuse values no normalization makes sense of: NaN, infinite, negative (scaled or centered data)."""
    values = X.data
    if values.size == 0:
        return
    n_nan = n_inf = 0
    for start in range(0, values.size, VALUE_BLOCK):  # bounded temporaries on atlas-sized data
        block = values[start:start + VALUE_BLOCK]
        finite = np.isfinite(block)
        if not finite.all():
            nan = int(np.isnan(block).sum())
            n_nan, n_inf = n_nan + nan, n_inf + int((~finite).sum()) - nan
    if n_nan or n_inf:
        raise ScnymError(
            f"{source} has {n_nan} NaN and {n_inf} infinite values; remove or impute them before running scnym")
    low = float(values.min())
    if low < 0:
        raise ScnymError(
            f"{source} has negative values (min {low:.3g}): it looks scaled or centered; give raw counts or "
            "log-normalized values instead (for h5ad: --input_layer raw or a counts layer)")


@dataclass
class FirstCells:
    """What the first DETECTION_ROWS cells of a dataset show."""

    n_cells: int = 0
    integers: bool = True
    high: float = 0.0                 # the largest value
    totals: dict = field(default_factory=lambda: {kind: [] for kind in BASES})  # of the first BASE_ROWS cells


def scan_first_cells(blocks: Iterable[sp.csr_matrix], source: str = "input") -> FirstCells:
    """Read the first DETECTION_ROWS cells of consecutive row blocks (a whole matrix is one block; a stream
    reads only those cells, a chunk at a time): refuse NaN / infinite / negative values, and a dataset whose
    first cells hold no value at all."""
    found = FirstCells()
    for block in blocks:
        block = block[:DETECTION_ROWS - found.n_cells]
        check_values(block, source)
        block_integers = _all_integers(block.data, finite=True)
        if block.nnz:
            found.integers = found.integers and block_integers
            found.high = max(found.high, float(block.data.max()))
        if found.n_cells < BASE_ROWS and not block_integers:  # counts need no log base
            for kind, sums in _totals_by_base(block[:BASE_ROWS - found.n_cells]).items():
                found.totals[kind].append(sums)
        found.n_cells += block.shape[0]
        if found.n_cells >= DETECTION_ROWS:
            break
    if found.n_cells and found.high == 0.0:
        raise ScnymError(f"{source}: its first {found.n_cells} cells have no expression at all (every value is 0); "
                         "check that the matrix (or --input_layer) holds the data")
    return found


def _kind_of(found: FirstCells, source: str) -> Kind:
    if found.integers:
        return "counts"
    if found.high > MAX_LOG_VALUE:
        raise ScnymError(
            f"{source} has non-integer values up to {found.high:.3g}: it looks normalized but not log-transformed "
            "(CPM/TPM); give raw counts or log1p-transformed values")
    return _log_base(found.totals, source)


def detect_kind(X: sp.csr_matrix, source: str = "input") -> Kind:
    """Raw counts or log-normalized (and which log base), from X's first DETECTION_ROWS cells (see
    :func:`scan_first_cells`); refuse anything else."""
    return _kind_of(scan_first_cells([X], source), source)


def _all_finite(values: np.ndarray) -> bool:
    return all(bool(np.isfinite(values[start:start + VALUE_BLOCK]).all())
               for start in range(0, values.size, VALUE_BLOCK))


def _all_integers(values: np.ndarray, *, finite: bool = False) -> bool:
    """Every value a whole number: x == trunc(x), looked at SCAN_VALUES at a time into reused buffers (a check of
    every streamed block: fresh whole-block temporaries made it 13% of a prediction); and finite, unless the
    caller has checked that (``finite``)."""
    if values.size == 0:
        return True
    truncated = np.empty(min(values.size, SCAN_VALUES), dtype=values.dtype)
    same = np.empty(len(truncated), dtype=bool)
    for start in range(0, values.size, SCAN_VALUES):
        chunk = values[start:start + SCAN_VALUES]
        n = len(chunk)
        np.trunc(chunk, out=truncated[:n])
        if not np.equal(chunk, truncated[:n], out=same[:n]).all():
            return False
    return finite or _all_finite(values)


def _totals_by_base(rows: sp.csr_matrix) -> dict[str, np.ndarray]:
    """Per non-empty row, the sum of base^x - 1 for each candidate log base."""
    rows = rows[np.diff(rows.indptr) > 0]
    return {kind: np.asarray(sp.csr_matrix((np.power(base, rows.data.astype(np.float64)) - 1.0, rows.indices,
                                            rows.indptr), shape=rows.shape).sum(axis=1)).ravel()
            for kind, base in BASES.items()}


def _log_base(totals: dict[str, list[np.ndarray]], source: str) -> Kind:
    """Natural, base-2 or base-10 log: the base under which every cell sums to one target total.

    When no base gives constant totals (the genes are a subset of those normalized over), the
    base cannot be told from the data: natural log is assumed (scanpy's log1p) and said.
    """
    for kind in BASES:
        sums = np.concatenate(totals[kind]) if totals[kind] else np.zeros(0)
        if len(sums) > 1 and sums.std() <= CONSTANT_SUM_SPREAD * sums.mean():
            if kind != "log1p":
                log.info("%s: values are %s(x + 1) of data normalized to %.4g per cell", source,
                         {"log2_1p": "log2", "log10_1p": "log10"}[kind], sums.mean())
            return kind  # type: ignore[return-value]
    log.info("%s: log-normalized values over a gene subset; the log base cannot be checked, natural log "
             "(log1p) is assumed (set --input_normalization log2_1p for log2 data)", source)
    return "log1p"


def _scale_rows(X: sp.csr_matrix, factors: np.ndarray) -> None:
    """Multiply each row of X in place, in blocks of about VALUE_BLOCK stored values (bounded temporaries
    whatever the number of genes per cell)."""
    start = 0
    while start < X.shape[0]:
        # the first row whose values reach VALUE_BLOCK past this block's first value
        stop = int(np.searchsorted(X.indptr, X.indptr[start] + VALUE_BLOCK, side="right")) - 1
        stop = min(max(stop, start + 1), X.shape[0])
        lo, hi = X.indptr[start], X.indptr[stop]
        per_entry = np.repeat(factors[start:stop].astype(X.data.dtype), np.diff(X.indptr[start:stop + 1]))
        X.data[lo:hi] *= per_entry
        start = stop


def _row_sums(X: sp.csr_matrix) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def to_log1p_cpm(X: sp.csr_matrix, kind: Kind, *, copy: bool = True) -> sp.csr_matrix:
    """ln(CPM + 1) of counts or of log-normalized values (any target sum, log base e, 2 or 10)."""
    X = X.copy() if copy else X
    if kind == "log1p":
        np.expm1(X.data, out=X.data)
    elif kind in BASES:
        np.power(np.float32(BASES[kind]), X.data, out=X.data)
        X.data -= 1.0
    sums = _row_sums(X)
    factors = np.divide(TARGET_SUM, sums, out=np.zeros_like(sums), where=sums > 0)
    _scale_rows(X, factors)
    # ln(1 + x) as log(1 + x): numpy's float32 log is vectorized, log1p is not (a block of 3.3 million values:
    # 8 vs 42 ms; every block is normalized again in each epoch of training from disk), and the result of a
    # value does not depend on where it sits in the array (torch's log1p differs by an ulp in the tail of its
    # vector loop, so blocks of other sizes would not give the same numbers). The values are CPM, whose
    # smallest nonzero is 1e6 / the cell's total (>= 1 below a million counts): 1 + x loses nothing there.
    np.add(X.data, 1.0, out=X.data)
    np.log(X.data, out=X.data)
    return X


def decide_kind(blocks: Iterable[sp.csr_matrix], mode: str = "auto", *, source: str = "input",
                announce: bool = True) -> str:
    """The kind of a dataset from its first cells (the first DETECTION_ROWS of consecutive row ``blocks``, or of
    one matrix): detected for ``auto``; else as declared, unless the values contradict the declaration."""
    if isinstance(blocks, sp.spmatrix):
        blocks = [blocks]
    found = scan_first_cells(blocks, source)
    if mode == "auto":
        return _kind_of(found, source)
    if mode in BASES and found.integers:
        if found.high > MAX_LOG_VALUE:
            raise ScnymError(f"{source}: --input_normalization {mode} was given but the values are integers up to "
                             f"{found.high:.3g}, far above any log-normalized value: these look like raw counts; "
                             "use --input_normalization counts (or auto)")
        if announce:
            log.warning("%s: --input_normalization %s was given but the values are integers", source, mode)
    if mode == "as_is" and found.high > AS_IS_MAX:
        raise ScnymError(f"{source}: --input_normalization as_is means the values are ln(CPM+1) already (at most "
                         f"{AS_IS_MAX:.1f}), but they reach {found.high:.3g}; use --input_normalization auto, or the "
                         "kind they are (counts, log1p, log2_1p, log10_1p)")
    return mode


def normalize(X: sp.csr_matrix, mode: str = "auto", *, source: str = "input", copy: bool = True,
              announce: bool = True, kind: Optional[str] = None) -> tuple[sp.csr_matrix, str]:
    """Bring X to ln(CPM + 1) according to ``input_normalization``.

    Parameters
    ----------
    X
        float32 CSR, cells x genes, over all genes of the file (before any gene subsetting,
        so that CPM means what it says).
    mode
        ``auto`` (detect), ``counts``, ``log1p``, ``log2_1p``, ``log10_1p`` or ``as_is`` (trusted,
        used unchanged).
    announce
        Log what was found (off for the 2nd.. chunk of a stream, which reports totals itself).
    kind
        The dataset's kind, decided already on its first cells (:func:`decide_kind`; the later chunks of a
        stream, the blocks of a file read from disk); by default decided on the first cells of X.

    Returns
    -------
    The normalized matrix and the kind that was found or declared.
    """
    if kind is None:
        kind = decide_kind(X, mode, source=source, announce=announce)
    # NaN / infinite / negative values are refused in every mode, and counts found by detection must be
    # integers in every cell, not only in the first ones
    check_values(X, source)
    if mode == "auto" and kind == "counts" and not _all_integers(X.data, finite=True):
        raise ScnymError(f"{source}: its first {min(DETECTION_ROWS, X.shape[0])} cells hold integer counts but later "
                         "cells do not: is the file a mix of raw and normalized data? Give one kind, or declare "
                         "--input_normalization counts if these are all counts (e.g. ambient-corrected)")
    empty = int((np.diff(X.indptr) == 0).sum())
    if announce and empty:
        log.warning("%s: %d cells have no expression at all; their predictions are meaningless", source, empty)
    if kind == "as_is":
        return (X.copy() if copy else X), kind
    if announce:
        log.info("%s: %s -> ln(CPM+1)", source, "raw counts" if kind == "counts" else f"log-normalized data ({kind})")
    X = to_log1p_cpm(X, cast(Kind, kind), copy=copy)
    if not _all_finite(X.data):  # de-logging values that were never logged overflows
        raise ScnymError(f"{source}: undoing the {kind} normalization overflows: the values are not {kind} data; "
                         "use --input_normalization auto, or the kind they are")
    return X, kind
