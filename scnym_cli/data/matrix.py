"""What scnym trains and predicts on: cells x genes that answer a selection of rows with CSR.

Three kinds implement it: a scipy CSR matrix (data in memory), :class:`~.stacked.StackedRows` (reference
and target CSR matrices stacked without a copy) and :class:`~.disk.DiskMatrix` (h5ad files read a block at a
time). Batching, evaluation, prediction and fingerprints use only what :class:`RowMatrix` declares; only a
sampler that must keep reads local asks whether the rows live on disk.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Protocol, Union, runtime_checkable

import numpy as np
import scipy.sparse as sp


@runtime_checkable
class RowMatrix(Protocol):
    """A matrix held in consecutive row blocks."""

    shape: tuple[int, int]

    def __getitem__(self, rows) -> sp.csr_matrix:
        """The rows asked for (indices or a slice), in that order, as CSR."""

    def row_blocks(self) -> Iterator[sp.csr_matrix]:
        """Every row, block after block, in row order."""


@runtime_checkable
class ReadsAhead(Protocol):
    """A matrix on disk that can start reading rows in the background before they are asked for."""

    def read_ahead_rows(self, rows) -> None: ...


#: what the readers produce and the trainer consumes
Matrix = Union[sp.csr_matrix, RowMatrix]


def read_ahead(X: Matrix, rows) -> None:
    """Tell a matrix on disk which rows come next (the next chunk of an evaluation); nothing for one in memory."""
    if isinstance(X, ReadsAhead):
        X.read_ahead_rows(rows)


def gather_rows(rows, n_rows: int, block_starts: np.ndarray, block: Callable[[int], sp.csr_matrix]
                ) -> sp.csr_matrix:
    """``rows`` of a matrix made of row blocks (block i starts at global row ``block_starts[i]``), each block
    read once, the result in the order the rows were asked for."""
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(n_rows))
    rows = np.asarray(rows, dtype=np.int64)
    which = np.searchsorted(block_starts, rows, side="right") - 1
    parts, order = [], []
    for index in np.unique(which):
        at = np.flatnonzero(which == index)
        parts.append(block(int(index))[rows[at] - block_starts[index]])
        order.append(at)
    if len(parts) == 1:
        return parts[0]
    stacked = sp.vstack(parts, format="csr")
    # rows come back grouped by block: put them in the order asked for
    return stacked[np.argsort(np.concatenate(order), kind="stable")]


def row_blocks(X: Matrix) -> Iterator[sp.csr_matrix]:
    """Consecutive row blocks of any kind of matrix (a CSR matrix is one block)."""
    if isinstance(X, sp.spmatrix) or isinstance(X, getattr(sp, "sparray", ())):
        yield X
    else:
        yield from X.row_blocks()


def dense_rows(X: Matrix, rows: np.ndarray | slice) -> np.ndarray:
    """Rows of X as a dense float32 array; only these rows are ever densified.

    scipy gathers the rows in compiled code (one vectorized call, no per-cell Python); a run of consecutive rows
    of a CSR matrix is densified from slices of its arrays (:func:`csr_rows`).
    """
    return csr_rows(X, rows).toarray().astype(np.float32, copy=False)


def csr_rows(X: Matrix, rows: np.ndarray | slice) -> sp.csr_matrix:
    """Rows of X as CSR, made from :func:`csr_arrays` (scipy's own row slicing of a run of rows took a third of
    the time of densifying it)."""
    data, indices, indptr = csr_arrays(X, rows)
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, X.shape[1]), copy=False)


def csr_arrays(X: Matrix, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of rows of X. A run of consecutive rows of a CSR matrix in memory (prediction's
    chunks) is slices of its arrays, only the small indptr new: no scipy matrix in between (scipy's constructor
    copies a slice much smaller than the array it comes from)."""
    if isinstance(rows, slice) and isinstance(X, sp.csr_matrix) and rows.step in (None, 1):
        start, stop, _ = rows.indices(X.shape[0])
        stop = max(start, stop)
        low, high = X.indptr[start], X.indptr[stop]
        return X.data[low:high], X.indices[low:high], X.indptr[start:stop + 1] - low
    block = X[rows]
    return block.data, block.indices, block.indptr


def bag_index(indices: np.ndarray, indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR column indices and row pointers in one integer type, as torch's embedding_bag asks: the small pointer
    array takes the indices' type where the number of values fits it (the large index array is not copied)."""
    if indices.dtype == indptr.dtype:
        return indices, indptr
    if indptr[-1] < np.iinfo(indices.dtype).max:
        return indices, indptr.astype(indices.dtype)
    return indices.astype(np.int64), indptr.astype(np.int64)


def sparse_product(X: sp.csr_matrix, W: np.ndarray) -> np.ndarray:
    """X @ W for a CSR X and a dense float32 W: each row the sum of W's rows at its nonzero columns, times their
    values (torch's embedding_bag, on torch's threads). Against torch's sparse CSR product, 8,192 x 2,000 at 20%
    nonzeros into 30 columns (the novelty clusters' projection) on 2 cores: 0.52 vs 0.99 us a row; scipy's
    product runs on one core."""
    import torch

    X = sp.csr_matrix(X, dtype=np.float32)
    if X.nnz == 0:
        return np.zeros((X.shape[0], W.shape[1]), dtype=np.float32)
    indices, indptr = bag_index(X.indices, X.indptr)
    with torch.no_grad():
        return torch.nn.functional.embedding_bag(
            torch.from_numpy(indices), torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)),
            torch.from_numpy(indptr), mode="sum", per_sample_weights=torch.from_numpy(X.data),
            include_last_offset=True).numpy()


def content_digest(X: Matrix) -> str:
    """sha256 of the matrix's content, the same however its rows are split into blocks."""
    return digest_and_nnz(X)[0]


def digest_and_nnz(X: Matrix) -> tuple[str, int]:
    """:func:`content_digest` and the number of stored values, in one pass over the rows (a matrix read
    from disk is read once, not twice)."""
    lengths, indices, values = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    nnz = 0
    for block in row_blocks(X):
        # .data: the arrays' bytes in place (contiguous), no copy
        lengths.update(np.diff(block.indptr).astype(np.int64).data)
        indices.update(np.ascontiguousarray(block.indices, dtype=np.int32).data)
        values.update(np.ascontiguousarray(block.data, dtype=np.float32).data)
        nnz += int(block.nnz)
    digest = hashlib.sha256("".join(h.hexdigest() for h in (lengths, indices, values)).encode()).hexdigest()
    return digest, nnz
