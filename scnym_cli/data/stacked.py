"""Several CSR matrices stacked by rows without copying them into one.

Reference and target data are trained on together; concatenating them with ``sp.vstack``
would hold both inputs and their copy at once (2x the matrices at atlas scale). ``StackedRows``
answers row selections (what batching and prediction need) from the blocks directly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp


class StackedRows:
    """Row-stacked CSR blocks that behave like one CSR matrix for ``X[rows]``."""

    def __init__(self, blocks: Sequence[sp.csr_matrix]):
        widths = {b.shape[1] for b in blocks}
        if len(widths) != 1:
            raise ValueError(f"blocks have different numbers of columns: {sorted(widths)}")
        self.blocks = list(blocks)
        self.offsets = np.cumsum([0] + [b.shape[0] for b in self.blocks])
        self.shape = (int(self.offsets[-1]), widths.pop())
        self.dtype = self.blocks[0].dtype

    @property
    def nnz(self) -> int:
        return int(sum(b.nnz for b in self.blocks))

    def __getitem__(self, rows) -> sp.csr_matrix:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, dtype=np.int64)
        block_of = np.searchsorted(self.offsets, rows, side="right") - 1
        parts, order = [], []
        for b in np.unique(block_of):
            at = np.flatnonzero(block_of == b)
            parts.append(self.blocks[b][rows[at] - self.offsets[b]])
            order.append(at)
        if len(parts) == 1:
            return parts[0]
        stacked = sp.vstack(parts, format="csr")
        # rows come back grouped by block: put them in the order asked for
        return stacked[np.argsort(np.concatenate(order), kind="stable")]


def stack_rows(*blocks: sp.csr_matrix):
    """One matrix-like of the blocks' rows in order (a plain CSR when there is a single block)."""
    flat = [b for block in blocks for b in (block.blocks if isinstance(block, StackedRows) else [block])]
    return flat[0] if len(flat) == 1 else StackedRows(flat)
