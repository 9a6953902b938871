"""Domain adversary: a domain classifier on the cell embedding behind a gradient-reversal layer.

The classifier learns to tell domains (reference vs target, or many donors/technologies) apart;
the reversed gradient pushes the embedding to make them indistinguishable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return -ctx.weight * grad_output, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by ``-weight``."""
    return _ReverseGradient.apply(x, float(weight))


class DomainClassifier(nn.Module):
    """Predicts each cell's domain from its embedding, through gradient reversal.

    Parameters
    ----------
    n_inputs
        Width of what the head sees: the embedding (the classifier's ``n_hidden``), or the embedding x
        class probabilities of a conditional adversary.
    n_domains
        Number of domains (>= 2).
    n_layers
        Hidden layers of the domain head (each Linear -> ReLU, its own weights).
    n_hidden
        Width of those hidden layers (default ``n_inputs``).
    """

    def __init__(self, n_inputs: int, n_domains: int, n_layers: int = 1, n_hidden: Optional[int] = None):
        super().__init__()
        n_hidden = n_hidden or n_inputs
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [nn.Linear(n_inputs if i == 0 else n_hidden, n_hidden), nn.ReLU()]
        self.head = nn.Sequential(*layers, nn.Linear(n_hidden if n_layers else n_inputs, n_domains))
        self.n_domains = n_domains

    def forward(self, embedding: torch.Tensor, reversal_weight: float) -> torch.Tensor:
        return self.head(reverse_gradient(embedding, reversal_weight))
