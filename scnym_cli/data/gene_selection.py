"""Which genes a model trains on: highly variable genes, ranked across datasets.

Across species and technologies most genes shift their baseline while carrying little about
cell identity; a model that sees all of them learns the reference's quirks. Highly variable
genes (Seurat's dispersion method, as scanpy's ``flavor="seurat"``) keep the genes whose
variation between cells is large for their mean expression: mostly cell-type programs.

With several datasets (the reference and the target), each is ranked on its own and genes are
ordered by the number of datasets whose top genes they are among, then by their mean normalized
dispersion (scanpy's ``batch_key`` rule): a gene variable in the reference but flat in the target
carries no identity signal there.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

N_MEAN_BINS = 20


def _mean_and_variance(blocks: Iterable[sp.csr_matrix], n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance of expm1(X) (CPM), one pass over CSR row blocks."""
    total = np.zeros(n_genes)
    squares = np.zeros(n_genes)
    n_cells = 0
    for block in blocks:
        values = np.expm1(block.data.astype(np.float64))
        total += np.bincount(block.indices, weights=values, minlength=n_genes)
        squares += np.bincount(block.indices, weights=values * values, minlength=n_genes)
        n_cells += block.shape[0]
    mean = total / max(n_cells, 1)
    variance = squares / max(n_cells, 1) - mean ** 2
    return mean, np.maximum(variance * n_cells / max(n_cells - 1, 1), 0.0)


def normalized_dispersion(blocks: Iterable[sp.csr_matrix], n_genes: int) -> np.ndarray:
    """log(variance / mean) of each gene, z-scored among genes of similar mean (20 bins of log1p(mean)).

    Genes never detected get -inf (never selected).
    """
    mean, variance = _mean_and_variance(blocks, n_genes)
    detected = mean > 0
    dispersion = np.full(n_genes, np.nan)
    dispersion[detected] = np.log(np.maximum(variance[detected], 1e-12) / mean[detected])
    frame = pd.DataFrame({"bin": pd.cut(np.log1p(mean), bins=N_MEAN_BINS), "dispersion": dispersion})
    grouped = frame.groupby("bin", observed=False)["dispersion"]
    bin_mean = grouped.transform("mean").to_numpy()
    bin_std = grouped.transform("std").to_numpy()
    # a gene alone in its bin (or in a bin of equal dispersions) is scored 1: kept when its bin is extreme
    single = ~np.isfinite(bin_std) | (bin_std == 0)
    normalized = np.where(single, 1.0, (dispersion - bin_mean) / np.where(single, 1.0, bin_std))
    return np.where(detected & np.isfinite(normalized), normalized, -np.inf)


def rank_genes(datasets: Sequence[Iterable[sp.csr_matrix]], n_genes: int, n_top: int) -> np.ndarray:
    """Every column index, most variable first: by the number of datasets whose ``n_top`` most variable genes
    hold it, then by the mean normalized dispersion over the datasets that detect it."""
    scores = np.vstack([normalized_dispersion(blocks, n_genes) for blocks in datasets])
    in_top = np.zeros(n_genes)
    for row in scores:
        in_top[np.argsort(-row, kind="stable")[:n_top]] += 1
    finite = np.isfinite(scores)
    counted = finite.sum(axis=0)
    mean_score = np.where(counted > 0, np.where(finite, scores, 0.0).sum(axis=0) / np.maximum(counted, 1), -np.inf)
    return np.lexsort((-mean_score, -in_top))


def highly_variable_genes(datasets: Sequence[Iterable[sp.csr_matrix]], n_genes: int, n_top: int) -> np.ndarray:
    """Column indices of the ``n_top`` most variable genes over ``datasets`` (each an iterable of CSR row
    blocks over the same ``n_genes`` columns), in column order."""
    if n_top >= n_genes:
        return np.arange(n_genes)
    return np.sort(rank_genes(datasets, n_genes, n_top)[:n_top])
