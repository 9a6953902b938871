"""Mini-batches from a CSR matrix: index sampling per epoch and one-batch-at-a-time densification."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol

import numpy as np
import torch

from .matrix import Matrix, dense_rows


def batch_tensor(X: Matrix, rows: np.ndarray | slice, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(dense_rows(X, rows)).to(device, non_blocking=True)


def class_balanced_probabilities(codes: np.ndarray) -> np.ndarray:
    """Probability of drawing each row: 1 / (size of its class), so that every class is drawn equally often."""
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights / weights.sum()


class EpochSampler:
    """Row indices for one epoch, in batches, shuffled or class-balanced, from a seeded generator.

    Parameters
    ----------
    rows
        The rows this sampler draws from.
    codes
        Integer class of every row of the full matrix (used for class balancing).
    balance_classes
        Draw ``len(rows)`` rows with replacement, each with probability proportional to
        1 / (size of its class): every class is seen equally often.
    drop_last
        Drop a last incomplete batch (batch norm needs more than one cell).
    min_batches
        An epoch has at least this many batches: with few cells it makes several shuffled passes, so
        that epochs (and what is counted in epochs: ramps, patience, evaluation) mean a similar number
        of optimizer steps on small and large data.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, *, codes: Optional[np.ndarray] = None,
                 balance_classes: bool = False, drop_last: bool = True, seed: int = 0, min_batches: int = 0):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = int(min(batch_size, max(len(self.rows), 1)))
        self.drop_last = drop_last
        one_pass = len(self.rows) // self.batch_size
        self.passes = max(1, -(-int(min_batches) // max(one_pass, 1)))
        self.rng = np.random.default_rng(seed)
        self.probabilities: Optional[np.ndarray] = None
        if balance_classes:
            if codes is None:
                raise ValueError("EpochSampler: balance_classes needs the codes of the rows")
            self.balance_by(codes)

    def balance_by(self, codes: np.ndarray) -> None:
        """From the next epoch on, draw rows with probability 1 / (size of their class in ``codes``), a
        code per row of the full matrix (labels, or pseudolabels of target cells)."""
        self.probabilities = class_balanced_probabilities(codes[self.rows])

    def __len__(self) -> int:
        full, rest = divmod(self.passes * len(self.rows), self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def state_dict(self) -> dict[str, Any]:
        """What the next epochs' draws depend on (training checkpoints): the generator and the weights."""
        return {"rng": self.rng.bit_generator.state, "probabilities": self.probabilities}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.probabilities = None if state["probabilities"] is None else np.asarray(state["probabilities"])

    def epoch(self) -> Iterator[np.ndarray]:
        if self.probabilities is None:
            order = np.concatenate([self.rng.permutation(self.rows) for _ in range(self.passes)])
        else:
            order = self.rng.choice(self.rows, size=self.passes * len(self.rows), replace=True, p=self.probabilities)
        for batch_index in range(len(self)):
            batch = order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
            if len(batch) > 1 or not self.drop_last:
                yield batch


class Sampler(Protocol):
    """Row batches epoch by epoch, from a generator whose state can be saved (EpochSampler, BlockShuffleSampler)."""

    def __len__(self) -> int: ...

    def epoch(self) -> Iterator[np.ndarray]: ...

    def balance_by(self, codes: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BatchStream:
    """A sampler's batches pass after pass, without end: target cells, drawn alongside the labeled batches,
    whose passes do not line up with the labeled epochs.

    Each pass is drawn whole when it starts, so the stream's position is data (the rest of the pass and the
    sampler's state) that a checkpoint can save and restore exactly.
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.pending: list[np.ndarray] = []   # the rest of the current pass, next batch last

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> np.ndarray:
        if not self.pending:
            self.pending = list(self.sampler.epoch())[::-1]
            if not self.pending:
                raise RuntimeError("a pass over the target cells gave no batch (fewer than 2 cells?)")
        return self.pending.pop()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.pending = [np.asarray(batch, dtype=np.int64) for batch in state["pending"]]


def chunks(n_rows: int, chunk_size: int) -> Iterator[np.ndarray]:
    """Consecutive row ranges covering ``n_rows`` (for prediction and evaluation)."""
    for start in range(0, n_rows, chunk_size):
        yield np.arange(start, min(start + chunk_size, n_rows))
