"""Training data larger than memory: rows of h5ad files read from disk, a block at a time.

A :class:`DiskMatrix` stands for the rows of one or more h5ad files (the shards of a reference,
then target data). Rows are read in blocks of ``block_rows`` consecutive cells; each block is
normalized to ln(CPM+1) over its file's genes and re-indexed to the training genes as it is read,
and the last few blocks are kept in a small cache. ``X[rows]`` returns CSR like an in-memory
matrix, so batching, evaluation and prediction work unchanged; :class:`BlockShuffleSampler`
draws batches so that each one touches only the blocks of its window.

Reading overlaps training: the sampler names the next window's blocks (and evaluation the next chunk's)
to :meth:`DiskMatrix.read_ahead`, and a background thread reads and normalizes them while the model
trains on the current ones. A block is the same whichever thread reads it, so results do not change.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..memory import release_freed_memory
from .batches import EpochSampler, class_balanced_probabilities
from .genes import reindex_columns
from .matrix import gather_rows
from .normalize import normalize
from .stream import H5adChunks


@dataclass
class DiskPart:
    """One file's rows: where they come from and how they become model input."""

    reader: H5adChunks
    source_genes: pd.Index          # the file's genes (after any --gene_map)
    kind: str                       # normalization, decided on the file's first cells
    offset: int                     # first global row
    mode: str = "auto"              # --input_normalization, as given (every block is checked against it)


class DiskMatrix:
    """Rows of several h5ad files, normalized and aligned to ``genes`` on read, behind a block cache: a
    :class:`~.matrix.RowMatrix`.

    ``read_ahead_blocks``: the most blocks read in the background ahead of use (0: every block is read when
    asked for). Blocks read ahead and not yet asked for are held apart from the cache, so memory is at most
    ``cache_blocks + read_ahead_blocks`` blocks.
    """

    def __init__(self, parts: list[DiskPart], genes: pd.Index, *, block_rows: int = 8192, cache_blocks: int = 16,
                 read_ahead_blocks: int = 0):
        self.parts, self.genes = parts, pd.Index(genes)
        self.block_rows, self.cache_blocks = block_rows, max(cache_blocks, 2)
        self.read_ahead_blocks = read_ahead_blocks
        self.shape = (parts[-1].offset + parts[-1].reader.n_cells, len(self.genes))
        self.dtype = np.float32
        # blocks never straddle files: (part, first row, last row + 1) in global rows
        self.block_bounds = []
        for index, part in enumerate(parts):
            for start in range(0, part.reader.n_cells, block_rows):
                stop = min(start + block_rows, part.reader.n_cells)
                self.block_bounds.append((index, part.offset + start, part.offset + stop))
        self.block_starts = np.array([b[1] for b in self.block_bounds], dtype=np.int64)
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self._pending: dict[int, Future] = {}     # blocks being read (or read) in the background
        self._lock = threading.Lock()             # the cache and the pending blocks, shared with the reader
        self._reader: Optional[ThreadPoolExecutor] = None
        self.blocks_read = 0

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_starts, np.asarray(rows, dtype=np.int64), side="right") - 1

    def _read(self, index: int) -> sp.csr_matrix:
        part_index, start, stop = self.block_bounds[index]
        part = self.parts[part_index]
        raw = part.reader.read(start - part.offset, stop - part.offset)
        X, _ = normalize(raw, part.mode, kind=part.kind, source=part.reader.source, copy=False, announce=False)
        if not part.source_genes.equals(self.genes):
            X = reindex_columns(X, part.source_genes, self.genes)
        return X

    def block(self, index: int) -> sp.csr_matrix:
        """Block ``index`` as model input (ln(CPM+1), training genes)."""
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
            pending = self._pending.pop(index, None)
        # a block on its way is waited for; its reading error (a mixed file, say) is raised here
        X = pending.result() if pending is not None else self._read(index)
        with self._lock:
            self._cache[index] = X
            self.blocks_read += 1
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
        return X

    def read_ahead(self, blocks: Iterable[int]) -> None:
        """Start reading ``blocks`` (in this order) in a background thread, those neither cached nor on their way,
        up to ``read_ahead_blocks`` at a time."""
        if self.read_ahead_blocks <= 0:
            return
        with self._lock:
            for index in blocks:
                index = int(index)
                if index in self._cache or index in self._pending:
                    continue
                if len(self._pending) >= self.read_ahead_blocks:
                    break
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scnym-read-ahead")
                self._pending[index] = self._reader.submit(self._read, index)

    def read_ahead_rows(self, rows) -> None:
        """:meth:`read_ahead` for the blocks holding ``rows`` (indices or a slice), in row order."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        self.read_ahead(np.unique(self.block_of(rows)))

    def __getitem__(self, rows) -> sp.csr_matrix:
        return gather_rows(rows, self.shape[0], self.block_starts, self.block)

    def row_blocks(self) -> Iterator[sp.csr_matrix]:
        return self.iter_blocks()

    def iter_blocks(self, parts: Optional[range] = None) -> Iterator[sp.csr_matrix]:
        """Every block in row order (only those of the files numbered ``parts``, when given), the next one read
        ahead."""
        wanted = [index for index, (part_index, _, _) in enumerate(self.block_bounds)
                  if parts is None or part_index in parts]
        for position, index in enumerate(wanted):
            self.read_ahead(wanted[position + 1:position + 2])
            yield self.block(index)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        self._pending.clear()
        for part in self.parts:
            part.reader.close()


class BlockShuffleSampler:
    """Batches for data on disk: shuffled blocks, rows shuffled within a window of blocks.

    Each epoch visits the blocks holding ``rows`` in a random order, ``window_blocks`` at a time;
    the rows of a window are shuffled (or drawn class-balanced) and cut into batches, so only the
    window's blocks need to be in memory. With a window covering every block the batches are
    exactly those of the in-memory :class:`~scnym_cli.data.batches.EpochSampler` (same seed).
    """

    def __init__(self, rows: np.ndarray, batch_size: int, matrix: DiskMatrix, *, window_blocks: int,
                 codes: Optional[np.ndarray] = None, balance_classes: bool = False, drop_last: bool = True,
                 seed: int = 0, min_batches: int = 0):
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.matrix, self.window_blocks = matrix, max(window_blocks, 1)
        self.block_ids = matrix.block_of(self.rows)
        self.unique_blocks = np.unique(self.block_ids)
        # the window's rows are shuffled by the in-memory sampler's own rule, on this sampler's rng
        # (min_batches matters only for data within one window: larger data has more batches than that)
        self._inner = EpochSampler(self.rows, batch_size, codes=codes, balance_classes=balance_classes,
                                   drop_last=drop_last, seed=seed, min_batches=min_batches)
        self.codes, self.balance = codes, balance_classes
        self.batch_size, self.drop_last = self._inner.batch_size, drop_last
        self.block_rng = np.random.default_rng([seed, 1])

    def __len__(self) -> int:
        return len(self._inner)

    def balance_by(self, codes: np.ndarray) -> None:
        """From the next epoch on, draw class-balanced by ``codes`` within each window (see EpochSampler)."""
        self.codes, self.balance = codes, True
        self._inner.balance_by(codes)

    def state_dict(self) -> dict[str, Any]:
        return {"block_rng": self.block_rng.bit_generator.state, "inner": self._inner.state_dict(),
                "codes": self.codes, "balance": self.balance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.block_rng.bit_generator.state = state["block_rng"]
        self._inner.load_state_dict(state["inner"])
        self.codes = None if state["codes"] is None else np.asarray(state["codes"])
        self.balance = bool(state["balance"])

    def epoch(self) -> Iterator[np.ndarray]:
        if len(self.unique_blocks) <= self.window_blocks:
            yield from self._inner.epoch()
            return
        order = self.block_rng.permutation(self.unique_blocks)
        carry = np.array([], dtype=np.int64)
        n_batches = 0
        for start in range(0, len(order), self.window_blocks):
            # this window's blocks are on their way already (named during the previous window), except in an
            # epoch's first window; the next window's are named once this window's first batch has taken its
            # blocks into the cache, and read while the model trains on this window
            current = order[start:start + self.window_blocks]
            upcoming = order[start + self.window_blocks:start + 2 * self.window_blocks]
            release_freed_memory()   # the blocks and batches of the last window, freed: handed back
            self.matrix.read_ahead(current)
            window = np.isin(self.block_ids, current)
            rows = self.rows[window]
            if self.balance and self.codes is not None:
                drawn = self._inner.rng.choice(rows, size=len(rows), replace=True,
                                               p=class_balanced_probabilities(self.codes[rows]))
            else:
                drawn = self._inner.rng.permutation(rows)
            pool = np.concatenate([carry, drawn])
            full = len(pool) // self.batch_size
            for b in range(full):
                if n_batches < len(self):
                    yield pool[b * self.batch_size:(b + 1) * self.batch_size]
                    n_batches += 1
                if b == 0:
                    self.matrix.read_ahead(upcoming)
            if full == 0:
                self.matrix.read_ahead(upcoming)
            carry = pool[full * self.batch_size:]
        if not self.drop_last and len(carry) and n_batches < len(self):
            yield carry
