"""Novelty: how unlike every reference cell a cell is, and "Unknown" at a chosen rate of false Unknowns.

The score is the mean cosine distance from a cell's embedding to its ``k`` nearest reference cells.
Left-one-class-out on the visible splits it separates cells of a type the model was not trained on
from known ones far better than 1 - confidence, which a model trained to be confident about every
reference type gives away for neighbours of a known type (bench/results/novelty.md).

At training a bank of reference embeddings (fit cells, at most ``BANK_CELLS``, drawn per class) is
kept beside the model, with the sorted scores of the model-selection cells: known types the weights
were not fit on. ``--unknown_rate r`` calls a query cell Unknown when its score is above the
(1 - r) quantile of theirs, so about r of the known cells of a query like the reference are lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# the bank's size sets the cost: a 256-wide embedding scored against 2,000 cells is a 1 GFLOP matrix product
# per 1,000 query cells, about what the classifier's own forward pass costs on 2,000 genes
BANK_CELLS = 2000
K_NEAREST = 10
# model-selection cells whose scores set the thresholds (a random draw of them on large data)
SELECTION_CELLS = 5000
NOVELTY_FILE = "novelty_reference.safetensors"
# query rows scored against the bank at once: 1,024 x 2,000 distances = 8 MB
SCORE_ROWS = 1024


def bank_rows(codes: np.ndarray, rows: np.ndarray, seed: int, cells: int = BANK_CELLS) -> np.ndarray:
    """At most ``cells`` of ``rows``, the same share of each class (all of a smaller class), sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(codes[rows])
    share = max(1, cells // max(len(classes), 1))
    drawn = [rng.permutation(rows[codes[rows] == c])[:share] for c in classes]
    return np.sort(np.concatenate(drawn)) if drawn else np.array([], dtype=np.int64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class NoveltyReference:
    """The reference bank (unit-length embeddings) and the model-selection cells' sorted scores."""

    bank: torch.Tensor
    selection_scores: np.ndarray
    k: int = K_NEAREST

    @classmethod
    def build(cls, bank_embedding: np.ndarray, selection_embedding: np.ndarray,
              k: int = K_NEAREST) -> "NoveltyReference":
        reference = cls(_unit(torch.as_tensor(bank_embedding, dtype=torch.float32)), np.zeros(0), k)
        reference.selection_scores = np.sort(reference.score(selection_embedding))
        return reference

    def score(self, embedding: np.ndarray, dtype: torch.dtype = torch.float32) -> np.ndarray:
        """Mean cosine distance of each embedding to its k nearest bank cells (0 = on top of reference cells).

        ``dtype``: the similarities' matrix product in bfloat16 (prediction's --inference_precision) is 3x
        faster on CPUs with bfloat16 instructions and moves a score by at most ~1e-3.
        """
        k = min(self.k, self.bank.shape[0])
        bank = self.bank if dtype == torch.float32 else self.bank.to(dtype)
        scores = []
        for start in range(0, len(embedding), SCORE_ROWS):
            query = _unit(torch.as_tensor(embedding[start:start + SCORE_ROWS], dtype=torch.float32))
            similarity = query.to(dtype) @ bank.T
            # the k largest picked in the product's own format (exactly those of it in float32, and cheaper)
            nearest = similarity.topk(k, dim=1).values.float()
            scores.append((1 - nearest).mean(dim=1).numpy())
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def threshold(self, rate: float) -> float:
        """The score above which a share ``rate`` of the model-selection (known) cells lies."""
        if len(self.selection_scores) == 0:
            return float("inf")
        return float(np.quantile(self.selection_scores, 1.0 - rate))

    def save(self, directory: Path) -> Path:
        path = Path(directory) / NOVELTY_FILE
        save_file({"bank": self.bank.contiguous(), "selection_scores": torch.from_numpy(
            np.ascontiguousarray(self.selection_scores, dtype=np.float32)), "k": torch.tensor([self.k])},
                  str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, directory: Path) -> Optional["NoveltyReference"]:
        """The model's novelty reference, or None for a model trained without one (older scnym)."""
        path = Path(directory) / NOVELTY_FILE
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return cls(tensors["bank"].float(), tensors["selection_scores"].numpy().astype(np.float64),
                   int(tensors["k"][0]))
