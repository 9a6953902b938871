"""Expression decoder: reconstructs each cell's expression profile from its embedding and its domain.

A training-only head (like the domain adversary's, it is not part of a saved model). Its loss asks the
embedding to keep what tells cells apart within a domain -- the variation the classification loss alone
lets go of for target cells -- while the domain one-hot beside the embedding explains each domain's own
gene baselines, so the embedding need not carry them (the decoder of scVI and scANVI, with a multinomial
count likelihood in place of their negative binomial: the inputs are depth-normalized).
"""

from __future__ import annotations

import torch
from torch import nn


class ExpressionDecoder(nn.Module):
    """(embedding, domain one-hot) -> log of each gene's share of the cell's counts.

    Parameters
    ----------
    n_embedding
        Width of the embedding (the classifier's ``n_hidden``).
    n_genes
        Genes reconstructed: the model's input genes.
    n_domains
        Width of the domain one-hot (soft for MixUp mixes).
    n_hidden
        Width of the one hidden layer (default ``n_embedding``).
    """

    def __init__(self, n_embedding: int, n_genes: int, n_domains: int, n_hidden: int | None = None):
        super().__init__()
        n_hidden = n_hidden or n_embedding
        self.hidden = nn.Sequential(nn.Linear(n_embedding + n_domains, n_hidden), nn.ReLU())
        self.output = nn.Linear(n_hidden, n_genes)
        self.n_domains = n_domains

    def forward(self, embedding: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(torch.cat([embedding, domains.to(embedding.dtype)], dim=1))
        return torch.log_softmax(self.output(hidden).float(), dim=1)


def profile_divergence(log_expression: torch.Tensor, log_shares: torch.Tensor) -> torch.Tensor:
    """Mean over cells of KL(profile || decoded shares): the multinomial negative log-likelihood of each cell's
    counts per unit of depth, less its profile's entropy (so a perfect reconstruction scores 0).

    ``log_expression`` is ln(CPM + 1); a cell with no counts adds 0.
    """
    values = torch.expm1(log_expression.float()).clamp_min(0.0)
    profile = values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    # xlogy: p log p with 0 log 0 = 0 (genes a cell lacks)
    return (torch.xlogy(profile, profile) - profile * log_shares).sum(dim=1).mean()
