"""Several CSR matrices stacked by rows without copying them into one.

Reference and target data are trained on together; concatenating them with ``sp.vstack``
would hold both inputs and their copy at once (2x the matrices at atlas scale). ``StackedRows``
answers row selections (what batching and prediction need) from the blocks directly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from .matrix import Matrix, gather_rows


class StackedRows:
    """Row-stacked CSR blocks: a :class:`~.matrix.RowMatrix`."""

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
        return gather_rows(rows, self.shape[0], self.offsets[:-1], lambda index: self.blocks[index])

    def row_blocks(self) -> Iterator[sp.csr_matrix]:
        yield from self.blocks


def stack_rows(*blocks: Matrix) -> Matrix:
    """One matrix-like of the blocks' rows in order (a plain CSR when there is a single block)."""
    flat = [b for block in blocks for b in (block.blocks if isinstance(block, StackedRows) else [block])]
    return flat[0] if len(flat) == 1 else StackedRows(flat)
