"""Batched forward passes over CSR rows, a chunk at a time: sparse into the first layer on CPU, densified elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, cast

import numpy as np
import scipy.sparse as sp
import torch

from ..data.matrix import Matrix, bag_index, csr_arrays, read_ahead
from ..nn.classifier import CellTypeClassifier
from ..nn.sparse_input import SPARSE_INPUT_MAX_DENSITY, SparseRows
from .device import Precision, flush_denormals, inference_autocast


@dataclass
class Outputs:
    logits: np.ndarray
    embedding: Optional[np.ndarray] = None

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits) / temperature, dim=1).numpy()


# rows passed through the model at once: larger chunks are slower on CPU, not faster (8,192 rows of
# 2,000 genes took 1.5-2x as long per cell as 2,048: a 65 MB dense chunk is fresh memory every time)
FORWARD_ROWS = 2048


def input_batch(X: Matrix, rows: np.ndarray | slice, device: torch.device, *, sparse: bool,
                covariates: Optional[np.ndarray] = None) -> tuple[torch.Tensor | SparseRows, Optional[torch.Tensor]]:
    """Rows of X and their covariates for a forward pass. With ``sparse`` and rows no denser than
    SPARSE_INPUT_MAX_DENSITY, the rows stay CSR (:class:`~..nn.sparse_input.SparseRows`, the covariate one-hot
    appended as columns after the genes, as the model concatenates them); otherwise they are densified."""
    data, indices, indptr = csr_arrays(X, rows)
    shape = (len(indptr) - 1, X.shape[1])
    if not sparse or len(data) > SPARSE_INPUT_MAX_DENSITY * shape[0] * shape[1]:
        x = torch.from_numpy(sp.csr_matrix((data, indices, indptr), shape=shape, copy=False).toarray()
                             .astype(np.float32, copy=False)).to(device, non_blocking=True)
        return x, None if covariates is None else torch.from_numpy(covariates).to(device)
    if covariates is not None:
        block = sp.hstack([sp.csr_matrix((data, indices, indptr), shape=shape, copy=False),
                           sp.csr_matrix(covariates, dtype=np.float32)], format="csr")
        data, indices, indptr, shape = block.data, block.indices, block.indptr, block.shape
    indices, indptr = bag_index(indices, indptr)
    return SparseRows(columns=torch.from_numpy(indices).to(device), pointers=torch.from_numpy(indptr).to(device),
                      values=torch.from_numpy(data.astype(np.float32, copy=False)).to(device),
                      n_columns=shape[1]), None


@torch.no_grad()
@flush_denormals()
def forward_rows(model: CellTypeClassifier, X: Matrix, rows: Optional[np.ndarray], device: torch.device,
                 *, chunk_size: int = FORWARD_ROWS, covariates: Optional[np.ndarray] = None,
                 with_embedding: bool = False, domain: int = 0, dtype: Optional[torch.dtype] = None) -> Outputs:
    """Logits (and embeddings) of ``rows`` of X in eval mode; the model's mode is restored after.

    ``domain``: whose batch-norm statistics a model with domain-specific batch norm uses (0 reference,
    1 target); other models ignore it.

    ``dtype``: the number format of the matrix products (prediction's --inference_precision, see
    :func:`~.device.inference_dtype`); by default that of training (mixed precision on CUDA, float32 elsewhere).

    The default chunk (FORWARD_ROWS: 2,048 cells, 16 MB dense at 2,000 genes) is faster than 8,192 on CPU and keeps
    evaluation's peak memory small.
    """
    # all rows in order: contiguous slices (no fancy-index copy of each chunk)
    selection: slice | np.ndarray = slice(None) if rows is None else np.asarray(rows)
    n_rows = X.shape[0] if isinstance(selection, slice) else len(selection)
    was_training = model.training
    model.eval()
    # training's own mixed precision (CUDA only), or prediction's --inference_precision
    autocast = Precision(device).autocast if dtype is None else partial(inference_autocast, device, dtype)
    # below float32 the small classifier head still runs in float32: logits to 7 digits
    head_in_float32 = dtype is not None and dtype != torch.float32
    # the first layer's product from the CSR rows themselves (nn/sparse_input.py): CPU float32 only (accelerators
    # and lower precisions are fast at the dense product)
    sparse = device.type == "cpu" and dtype in (None, torch.float32)
    logits, embeddings = [], []
    try:
        def rows_of(start: int) -> slice | np.ndarray:
            stop = min(start + chunk_size, n_rows)
            return slice(start, stop) if isinstance(selection, slice) else selection[start:stop]

        for start in range(0, n_rows, chunk_size):
            chunk_rows = rows_of(start)
            if start + chunk_size < n_rows:   # data on disk: the next chunk is read during this one
                read_ahead(X, rows_of(start + chunk_size))
            x, c = input_batch(X, chunk_rows, device, sparse=sparse,
                               covariates=None if covariates is None else covariates[chunk_rows])
            with autocast():
                embedding = model.embed(x, c, **({"domain": domain} if domain else {}))
                if not head_in_float32:
                    out = model.classifier(embedding)
            if head_in_float32:
                out = model.classifier(embedding.float())
            logits.append(out.float().cpu().numpy())
            if with_embedding:
                embeddings.append(embedding.float().cpu().numpy())
            # drop this chunk before the next one is made: two dense chunks alive at once
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
