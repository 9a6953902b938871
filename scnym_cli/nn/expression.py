"""The expression scale every model input is on, ln(CPM + 1), computed from counts on tensors (input dropout
and MixMatch's augmentations work in count space and come back to it). The same target sum as the readers'
normalization (data/normalize.py)."""

from __future__ import annotations

import torch

from ..data.normalize import TARGET_SUM


def log_cpm(counts: torch.Tensor) -> torch.Tensor:
    """ln(CPM + 1) of each row; a cell left with no counts stays all zero (CPM / its size would be infinite,
    and 0 x inf is NaN)."""
    size = counts.sum(dim=1, keepdim=True)
    scale = torch.where(size > 0, TARGET_SUM / size.clamp_min(1e-30), torch.zeros_like(size))
    return torch.log1p(counts * scale)


def rescale_to_genes(x: torch.Tensor) -> torch.Tensor:
    """ln(CPM + 1) rows re-expressed per million over these columns only: each cell's depth measured over the
    model's genes. Data normalized over different gene sets then agree (a query log-normalized over all of its
    genes and kept for a few hundred of them would otherwise sit ln(total / kept) higher than a reference
    normalized over the same genes' whole transcriptome), and rows already normalized over these genes are left
    as they are (CPM is scale-free)."""
    return log_cpm(torch.expm1(x.float())).to(x.dtype)
