"""Training objectives: what one optimization step minimizes.

An objective turns a batch into a loss and a dict of named terms that go to the epoch log.
The trainer owns everything else (data, optimizer, devices, epochs, model selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..nn.classifier import CellTypeClassifier
from .losses import soft_cross_entropy


@dataclass
class LabeledBatch:
    x: torch.Tensor                      # cells x genes, ln(CPM + 1)
    target: torch.Tensor                 # cells x classes, one-hot
    covariates: Optional[torch.Tensor] = None
    domains: Optional[torch.Tensor] = None


class Objective(torch.nn.Module):
    """What one step minimizes, as a module that owns the model (and any extra trained parts, like a
    domain head): the optimizer trains its parameters, and one DistributedDataParallel wrapper around
    it averages every gradient of a step.

    ``forward(batch, epoch, unlabeled)`` returns (loss, named terms for the log, logits of the
    labeled cells).
    """

    model: CellTypeClassifier

    def __init__(self, model: CellTypeClassifier):
        super().__init__()
        self.model = model

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to update a mean teacher)."""


def mixup(x: torch.Tensor, target: torch.Tensor, covariates: Optional[torch.Tensor], alpha: float):
    """MixUp within a batch; lambda' = max(lambda, 1 - lambda) keeps each sample dominant in its mix."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    lam = max(lam, 1.0 - lam)
    partner = torch.randperm(x.shape[0], device=x.device)
    mixed_x = lam * x + (1 - lam) * x[partner]
    mixed_target = lam * target + (1 - lam) * target[partner]
    mixed_cov = None if covariates is None else lam * covariates + (1 - lam) * covariates[partner]
    return mixed_x, mixed_target, mixed_cov


class SupervisedObjective(Objective):
    """Cross-entropy on labeled cells, optionally class-weighted and MixUp-ed."""

    def __init__(self, model: CellTypeClassifier, class_weight: Optional[torch.Tensor] = None,
                 mixup_alpha: Optional[float] = None):
        super().__init__(model)
        self.class_weight = class_weight
        self.mixup_alpha = mixup_alpha

    def forward(self, batch: LabeledBatch, epoch: int, unlabeled=None
                ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        x, target, covariates = batch.x, batch.target, batch.covariates
        if self.mixup_alpha:
            x, target, covariates = mixup(x, target, covariates, self.mixup_alpha)
        logits = self.model(x, covariates)
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        loss = soft_cross_entropy(logits, target, weight)
        return loss, {"supervised_loss": float(loss.detach())}, logits.detach()
