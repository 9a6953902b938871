"""Training objectives: what one optimization step minimizes.

An objective turns a batch into a loss and a dict of named terms that go to the epoch log.
The trainer owns everything else (data, optimizer, devices, epochs, model selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .losses import soft_cross_entropy


@dataclass
class LabeledBatch:
    x: torch.Tensor                      # cells x genes, ln(CPM + 1)
    target: torch.Tensor                 # cells x classes, one-hot
    covariates: Optional[torch.Tensor] = None
    domains: Optional[torch.Tensor] = None


class Objective:
    """Hooks the trainer calls around the steps; objectives without extra state keep the defaults."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters beyond the model's that the optimizer must update (e.g. a domain head)."""
        return []

    def to(self, device: torch.device) -> "Objective":
        return self

    def train(self) -> None:
        """Put the objective's own modules in training mode (once per epoch)."""

    def after_step(self, model: torch.nn.Module) -> None:
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

    def __init__(self, class_weight: Optional[torch.Tensor] = None, mixup_alpha: Optional[float] = None):
        self.class_weight = class_weight
        self.mixup_alpha = mixup_alpha

    def __call__(self, model: torch.nn.Module, batch: LabeledBatch, epoch: int, unlabeled=None
                 ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        x, target, covariates = batch.x, batch.target, batch.covariates
        if self.mixup_alpha:
            x, target, covariates = mixup(x, target, covariates, self.mixup_alpha)
        logits = model(x, covariates)
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        loss = soft_cross_entropy(logits, target, weight)
        return loss, {"supervised_loss": float(loss.detach())}, logits.detach()
