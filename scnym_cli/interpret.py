"""Which genes drive a class: two attribution methods on a trained classifier (tensor level).

- Input optimization (Kimmel 2019): for each class, find a non-negative expression profile that
  maximizes the class's log-probability minus an L1 penalty, from several random starts,
  all classes and starts optimized together as one batch.
- Expected gradients (Erion et al. 2021, used by scNym 2021): attribution of gene g for cell x
  and class c = E_{x' ~ reference, a ~ U(0,1)} [(x_g - x'_g) * d log p_c / d x_g at x' + a (x - x')],
  estimated by sampling reference cells and interpolation points.

Both run the model in eval mode and leave the caller's random state untouched.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from .data.matrix import dense_rows
from .nn.classifier import CellTypeClassifier
from .train.device import flush_denormals, seeded_rng


@flush_denormals()
def optimize_class_inputs(model: CellTypeClassifier, classes: list[int], *, n_restarts: int = 5, n_steps: int = 300,
                          l1: float = 1e-4, lr: float = 0.05, seed: int = 0, device: torch.device | str = "cpu",
                          covariates: Optional[np.ndarray] = None) -> np.ndarray:
    """Optimal non-negative inputs, one per class and restart: array (classes, restarts, genes).

    ``covariates`` (one row) is the fixed covariate one-hot of a tissue-dependent model.
    """
    model.eval()
    n_genes = model.n_genes
    targets = torch.as_tensor(np.repeat(classes, n_restarts), device=device)
    with seeded_rng(seed):
        # softplus(z) keeps the profile non-negative; starts spread over low expression values
        z = (torch.rand(len(targets), n_genes) * 2 - 3).to(device).requires_grad_(True)
    cov = None
    if covariates is not None:
        cov = torch.as_tensor(np.repeat(covariates[None, :], len(targets), axis=0), device=device)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(n_steps):
        optimizer.zero_grad(set_to_none=True)
        x = F.softplus(z)
        log_probability = F.log_softmax(model(x, cov).float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        # each row is its own problem: summing keeps their gradients independent
        loss = (-log_probability + l1 * x.sum(dim=1)).sum()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return F.softplus(z).detach().cpu().numpy().reshape(len(classes), n_restarts, n_genes)


@flush_denormals()
def expected_gradients(model: CellTypeClassifier, X: sp.csr_matrix, target_rows: np.ndarray,
                       reference_rows: np.ndarray, class_index: int, *, n_samples: int = 64, seed: int = 0,
                       device: torch.device | str = "cpu", covariates: Optional[np.ndarray] = None,
                       max_points: int = 4096) -> np.ndarray:
    """Per-cell attributions (target cells x genes) of each gene to the log-probability of ``class_index``.

    Reference cells are drawn with replacement from ``reference_rows``; ``n_samples`` (reference,
    interpolation point) pairs per target cell. Work is batched to ``max_points`` points at a time.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    cells_per_batch = max(1, max_points // n_samples)
    attributions = np.zeros((len(target_rows), X.shape[1]), dtype=np.float32)
    for start in range(0, len(target_rows), cells_per_batch):
        rows = target_rows[start:start + cells_per_batch]
        b = len(rows)
        x = torch.from_numpy(dense_rows(X, rows)).to(device).repeat_interleave(n_samples, dim=0)
        reference_draw = rng.choice(reference_rows, size=b * n_samples, replace=True)
        reference = torch.from_numpy(dense_rows(X, reference_draw)).to(device)
        alpha = torch.from_numpy(rng.random((b * n_samples, 1), dtype=np.float32)).to(device)
        points = (reference + alpha * (x - reference)).requires_grad_(True)
        cov = None
        if covariates is not None:
            cov = torch.from_numpy(covariates[np.repeat(rows, n_samples)]).to(device)
        log_probability = F.log_softmax(model(points, cov).float(), dim=1)[:, class_index]
        (gradient,) = torch.autograd.grad(log_probability.sum(), points)
        per_point = ((x - reference) * gradient).reshape(b, n_samples, -1).mean(dim=1)
        attributions[start:start + b] = per_point.detach().cpu().numpy()
    return attributions


def rank_optima(optima: np.ndarray) -> np.ndarray:
    """Class specificity of each gene in the optimized inputs: the class's mean optimum minus the
    mean optimum of the other classes (classes x genes)."""
    mean = optima.mean(axis=1)
    if mean.shape[0] == 1:
        return mean
    others = (mean.sum(axis=0, keepdims=True) - mean) / (mean.shape[0] - 1)
    return mean - others
