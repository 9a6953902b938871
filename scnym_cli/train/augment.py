"""Count-space augmentations of ln(CPM + 1) profiles, for MixMatch's students and teachers.

Each maps a batch to a batch on the same scale, using the global torch RNG (seeded by the trainer).
"""

from __future__ import annotations

from typing import Callable

import torch

CPM = 1e6
# pseudo-depth for Poisson resampling: a typical droplet cell's UMI count
POISSON_DEPTH = 2000.0


def _to_log_cpm(counts: torch.Tensor) -> torch.Tensor:
    size = counts.sum(dim=1, keepdim=True).clamp_min(torch.finfo(counts.dtype).tiny)
    return torch.log1p(counts * (CPM / size))


def log1p_drop(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Drop each measured value with probability ``rate`` (technical dropout), renormalize."""
    counts = torch.expm1(x.float())
    if counts.device.type != "cpu":
        return _to_log_cpm(counts * (torch.rand_like(counts) >= rate)).to(x.dtype)
    # zeros stay zero: drawing for the measured values only is 2x faster on CPU (a 256 x 2,000 batch
    # at 15% density: 2.3 ms vs 5.4 ms), the same distribution
    flat = counts.view(-1)  # expm1 made a new tensor: safe to change in place
    measured = flat.nonzero().squeeze(1)
    flat[measured[torch.rand(measured.shape[0]) < rate]] = 0
    return _to_log_cpm(counts).to(x.dtype)


def log1p_mask(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Zero the same random ``rate`` of genes in every cell of the batch (genes absent from a
    panel or a query), renormalize."""
    counts = torch.expm1(x.float())
    keep = torch.rand(counts.shape[1], device=counts.device) >= rate
    return _to_log_cpm(counts * keep).to(x.dtype)


def poisson(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Resample counts from Poisson(profile x depth) at a droplet-like depth (sampling noise)."""
    counts = torch.expm1(x.float())
    expected = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12) * POISSON_DEPTH
    return _to_log_cpm(torch.poisson(expected)).to(x.dtype)


def identity(x: torch.Tensor, rate: float) -> torch.Tensor:
    return x


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "log1p_drop": log1p_drop,
    "log1p_mask": log1p_mask,
    "poisson": poisson,
    "none": identity,
}
