"""Check and bring expression to the model's scale: ln(CPM + 1).

Raw integer counts are normalized; log-normalized input at any per-cell target sum
(CP10k, CPM, ...) and log base (e, 2, 10; detected when the cells' totals allow it) is rescaled
to CPM; negative (scaled), NaN/infinite and linear
(CPM/TPM without the log) values are refused with a message that says what to pass instead.
All work is on the CSR ``data`` array, row block by row block, so memory stays bounded.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import numpy as np
import scipy.sparse as sp

from ..errors import ScnymError

log = logging.getLogger(__name__)

TARGET_SUM = 1e6
# ln(1e8 + 1) ~ 18.4: log-normalized values above this are implausible for any target sum.
MAX_LOG_VALUE = 20.0
VALUE_BLOCK = 1 << 24

Kind = Literal["counts", "log1p", "log2_1p", "log10_1p"]
BASES = {"log1p": np.e, "log2_1p": 2.0, "log10_1p": 10.0}
# rows whose de-logged values sum to the same total within this relative spread were normalized
# over exactly these genes with that log base
CONSTANT_SUM_SPREAD = 1e-3


def detect_kind(X: sp.csr_matrix, source: str = "input", *, detect: bool = True) -> Optional[Kind]:
    """Say whether stored values are raw counts or log-normalized; refuse anything else.

    With ``detect=False`` only the refusals are checked (NaN, infinite, negative values) and None
    is returned: for data whose kind was declared, or decided on an earlier block of the same file.
    """
    values = X.data
    if values.size == 0:
        return "counts" if detect else None
    n_nan = n_inf = 0
    integers = detect
    for start in range(0, values.size, VALUE_BLOCK):  # bounded temporaries on atlas-sized data
        block = values[start:start + VALUE_BLOCK]
        finite = np.isfinite(block)
        if not finite.all():
            nan = int(np.isnan(block).sum())
            n_nan, n_inf = n_nan + nan, n_inf + int((~finite).sum()) - nan
        elif integers:
            integers = bool(np.all(np.mod(block, 1) == 0))
    if n_nan or n_inf:
        raise ScnymError(
            f"{source} has {n_nan} NaN and {n_inf} infinite values; remove or impute them before running scnym")
    low = float(values.min())
    if low < 0:
        raise ScnymError(
            f"{source} has negative values (min {low:.3g}): it looks scaled or centered; give raw counts or "
            "log-normalized values instead (for h5ad: --input_layer raw or a counts layer)")
    if not detect:
        return None
    if integers:
        return "counts"
    high = float(values.max())
    if high > MAX_LOG_VALUE:
        raise ScnymError(
            f"{source} has non-integer values up to {high:.3g}: it looks normalized but not log-transformed "
            "(CPM/TPM); give raw counts or log1p-transformed values")
    return _detect_log_base(X, source)


def _detect_log_base(X: sp.csr_matrix, source: str, n_rows: int = 2000) -> Kind:
    """Natural, base-2 or base-10 log: the base under which every cell sums to one target total.

    When no base gives constant totals (the genes are a subset of those normalized over), the
    base cannot be told from the data: natural log is assumed (scanpy's log1p) and said.
    """
    rows = X[: min(n_rows, X.shape[0])]
    rows = rows[np.diff(rows.indptr) > 0]
    for kind, base in BASES.items():
        totals = np.asarray(sp.csr_matrix((np.power(base, rows.data.astype(np.float64)) - 1.0, rows.indices,
                                           rows.indptr), shape=rows.shape).sum(axis=1)).ravel()
        if len(totals) > 1 and totals.std() <= CONSTANT_SUM_SPREAD * totals.mean():
            if kind != "log1p":
                log.info("%s: values are %s(x + 1) of data normalized to %.4g per cell", source,
                         {"log2_1p": "log2", "log10_1p": "log10"}[kind], totals.mean())
            return kind
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
    np.log1p(X.data, out=X.data)
    return X


def normalize(X: sp.csr_matrix, mode: str = "auto", *, source: str = "input", copy: bool = True,
              announce: bool = True) -> tuple[sp.csr_matrix, str]:
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

    Returns
    -------
    The normalized matrix and the kind that was found or declared.
    """
    # NaN / negative checks apply in every mode; the kind is only worked out when it is asked for
    # (auto) or to warn about a declared log-normalization that looks like counts
    detected = detect_kind(X, source, detect=mode == "auto" or (announce and mode in BASES))
    kind = detected if mode == "auto" else mode
    if announce and mode in BASES and detected == "counts" and X.nnz:
        log.warning("%s: --input_normalization %s was given but the values are integers", source, mode)
    empty = int((np.diff(X.indptr) == 0).sum())
    if announce and empty:
        log.warning("%s: %d cells have no expression at all; their predictions are meaningless", source, empty)
    if kind == "as_is":
        return (X.copy() if copy else X), kind
    if announce:
        log.info("%s: %s -> ln(CPM+1)", source, "raw counts" if kind == "counts" else f"log-normalized data ({kind})")
    return to_log1p_cpm(X, kind, copy=copy), kind
