"""An exponential moving average of the weights (Polyak averaging): the model that is evaluated each epoch and
kept, when a run asks for it.

The weights a step lands on carry the noise of its batch; their average over the last hundred or so steps
sits nearer the middle of the region they wander in. Batch-norm statistics are averaged with the weights, so
the averaged model normalizes with statistics that match it. torch's :class:`~torch.optim.swa_utils.AveragedModel`
does the bookkeeping; the update below adds a warm-up, since a fixed decay would keep the first steps' weights
(barely trained) in the average for most of a short run.
"""

from __future__ import annotations

from typing import Sequence, Union, cast

import torch
from torch.optim.swa_utils import AveragedModel

from ..nn.classifier import CellTypeClassifier


def warmed_decay(decay: float, n_averaged: int) -> float:
    """``decay``, lowered while few steps are averaged: n / (n + 1) makes the average the plain mean of every
    step so far, until the average holds as many steps as the decay's horizon 1 / (1 - decay)."""
    return min(decay, n_averaged / (n_averaged + 1.0))


def weight_average(model: CellTypeClassifier, decay: float) -> AveragedModel:
    """A copy of ``model`` whose parameters and float buffers follow the model's as a moving average with
    ``decay`` (warmed up, see :func:`warmed_decay`); integer buffers (batch counts) are copied."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"weight averaging decay must lie in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor],
               n_averaged: Union[torch.Tensor, int]) -> None:
        weight = 1.0 - warmed_decay(decay, int(n_averaged))
        floats = [(a, c) for a, c in zip(averaged, current) if torch.is_floating_point(a)]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not torch.is_floating_point(a):
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def averaged_classifier(averaged: AveragedModel) -> CellTypeClassifier:
    """The averaged copy of the classifier (what is evaluated and kept)."""
    return cast(CellTypeClassifier, averaged.module)
