"""Loss functions. Each takes logits and applies log-softmax exactly once."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy against a probability target (one-hot or MixUp-ed), mean over cells.

    With ``class_weight`` each class's term is scaled by its weight (inverse frequency).
    """
    log_probabilities = F.log_softmax(logits.float(), dim=1)
    per_class = -target * log_probabilities
    if class_weight is not None:
        per_class = per_class * class_weight
    return per_class.sum(dim=1).mean()


def inverse_frequency_weights(codes, n_classes: int) -> torch.Tensor:
    """Class weights proportional to 1 / class size, averaging 1 over the training cells."""
    counts = torch.bincount(torch.as_tensor(codes, dtype=torch.long), minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights
