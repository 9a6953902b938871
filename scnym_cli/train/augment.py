"""Count-space augmentations of ln(CPM + 1) profiles, for MixMatch's students and teachers.

Each maps a batch to a batch on the same scale, using the global torch RNG (seeded by the trainer).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..nn.expression import log_cpm

# pseudo-depth for Poisson resampling: a typical droplet cell's UMI count
POISSON_DEPTH = 2000.0


def log1p_drop(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Drop each measured value with probability ``rate`` (technical dropout), renormalize.

    The mask is drawn for every value (zeros stay zero whatever it says): on a 256-cell Kang batch
    (1,287 genes, 28% non-zero) this is 3.2 ms against 5.2 ms for drawing only for the measured
    values, whose ``nonzero()`` scan costs more than the draws it saves.
    """
    counts = torch.expm1(x.float())
    return log_cpm(counts * (torch.rand_like(counts) >= rate)).to(x.dtype)


def log1p_mask(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Zero the same random ``rate`` of genes in every cell of the batch (genes absent from a
    panel or a query), renormalize."""
    counts = torch.expm1(x.float())
    keep = torch.rand(counts.shape[1], device=counts.device) >= rate
    return log_cpm(counts * keep).to(x.dtype)


def poisson(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Resample counts from Poisson(profile x depth) at a droplet-like depth (sampling noise)."""
    counts = torch.expm1(x.float())
    expected = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12) * POISSON_DEPTH
    return log_cpm(torch.poisson(expected)).to(x.dtype)


def identity(x: torch.Tensor, rate: float) -> torch.Tensor:
    return x


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "log1p_drop": log1p_drop,
    "log1p_mask": log1p_mask,
    "poisson": poisson,
    "none": identity,
}
