"""Batched forward passes over CSR rows, one chunk densified at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, cast

import numpy as np
import torch

from ..data.batches import batch_tensor, chunks
from ..data.matrix import Matrix
from ..nn.classifier import CellTypeClassifier
from .device import Precision, flush_denormals


@dataclass
class Outputs:
    logits: np.ndarray
    embedding: Optional[np.ndarray] = None

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits) / temperature, dim=1).numpy()


@torch.no_grad()
@flush_denormals()
def forward_rows(model: CellTypeClassifier, X: Matrix, rows: Optional[np.ndarray], device: torch.device,
                 *, chunk_size: int = 2048, covariates: Optional[np.ndarray] = None,
                 with_embedding: bool = False, domain: int = 0) -> Outputs:
    """Logits (and embeddings) of ``rows`` of X in eval mode; the model's mode is restored after.

    ``domain``: whose batch-norm statistics a model with domain-specific batch norm uses (0 reference,
    1 target); other models ignore it.

    The default chunk (2,048 cells, 16 MB dense at 2,000 genes) is as fast as 8,192 on CPU
    (60k cells: 69-74k vs 39-56k cells/s) and keeps evaluation's peak memory small.
    """
    # all rows in order: contiguous slices (no fancy-index copy of each chunk)
    selection: slice | np.ndarray = slice(None) if rows is None else np.asarray(rows)
    n_rows = X.shape[0] if isinstance(selection, slice) else len(selection)
    was_training = model.training
    model.eval()
    precision = Precision(device)
    logits, embeddings = [], []
    try:
        for positions in chunks(n_rows, chunk_size):
            chunk_rows = (slice(positions[0], positions[-1] + 1) if isinstance(selection, slice)
                          else selection[positions])
            x = batch_tensor(X, chunk_rows, device)
            c = None if covariates is None else torch.from_numpy(covariates[chunk_rows]).to(device)
            with precision.autocast():
                out, embedding = model(x, c, return_embedding=True, **({"domain": domain} if domain else {}))
            logits.append(out.float().cpu().numpy())
            if with_embedding:
                embeddings.append(embedding.float().cpu().numpy())
            # drop this chunk before the next one is densified: two dense chunks alive at once
            # doubled the peak memory of evaluation on large data
            del x, out, embedding
    finally:
        model.train(was_training)
    n_classes = model.n_classes
    return Outputs(
        logits=np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32),
        embedding=(np.concatenate(embeddings) if embeddings else np.zeros((0, model.n_hidden), np.float32))
        if with_embedding else None,
    )


def embed_rows(model: CellTypeClassifier, X: Matrix, rows: Optional[np.ndarray], device: torch.device,
               **options) -> np.ndarray:
    """The embedding of ``rows`` of X (:func:`forward_rows` with the embedding)."""
    outputs = forward_rows(model, X, rows, device, with_embedding=True, **options)
    return cast(np.ndarray, outputs.embedding)  # an array whenever with_embedding is asked
