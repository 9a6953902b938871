"""The scNym cell-type classifier: a tensor-only MLP.

Input: ln(CPM + 1) expression, cells x genes (plus an optional covariate one-hot, e.g. the
tissue). Output: class logits; the last hidden layer is the cell embedding. Every layer is a
separate module with its own weights (the original reused one module object for all hidden
layers, which silently tied their weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import torch
from torch import nn

from .expression import log_cpm, rescale_to_genes
from .sparse_input import SparseRows, linear, per_million


class InputDropout(nn.Module):
    """Technical-dropout augmentation in count space: expm1 -> drop entries -> CPM -> log1p.

    Active only in training mode; the output stays on the ln(CPM + 1) scale.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"input dropout must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        counts = torch.expm1(x.float())
        return log_cpm(counts * (torch.rand_like(counts) >= self.p)).to(x.dtype)


class Dropout(nn.Module):
    """Dropout (zero with probability p, scale survivors by 1 / (1 - p)), the mask drawn with rand_like.

    The same distribution as torch's nn.Dropout, which on CPU draws its mask with bernoulli_: about
    3x slower (a 256 x 256 activation, forward + backward on 2 cores: 0.90 ms vs 0.32 ms), and the
    hidden dropouts were 16% of a supervised training step's time. On accelerators torch's fused
    kernel is used.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


REFERENCE, TARGET = 0, 1


@dataclass
class DomainRows:
    """The domain of every row of a batch and, optionally, each row's weight in its domain's batch
    statistics (training only; e.g. reference cells weighted by class to the target's composition)."""

    domains: torch.Tensor
    weights: Optional[torch.Tensor] = None


# Which domain's batch-norm statistics normalize a batch: one for all rows (REFERENCE or TARGET), or one
# per row (a tensor of domains, or DomainRows with weights). Models without domain-specific batch norm
# ignore it.
Domain = Union[int, torch.Tensor, DomainRows, None]


class DomainBatchNorm(nn.Module):
    """Domain-specific batch norm (DSBN, Chang et al. 2019): one BatchNorm1d -- statistics and affine
    scale -- per domain (0 = reference, 1 = target); each row is normalized by its domain's.

    In training every domain's rows of a batch form their own batch, so the layers below need not
    remove the shift between domains for the layers above to see it removed.
    """

    def __init__(self, n_features: int, n_domains: int, track_running_stats: bool):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(n_features, track_running_stats=track_running_stats)
                                   for _ in range(n_domains))

    def forward(self, x: torch.Tensor, domain: Domain = None) -> torch.Tensor:
        if domain is None or isinstance(domain, int):
            return self._normalize(cast(nn.BatchNorm1d, self.norms[domain or 0]), x)
        domains, weights = (domain.domains, domain.weights) if isinstance(domain, DomainRows) else (domain, None)
        out = torch.empty_like(x)
        for index, norm in enumerate(self.norms):
            rows = domains == index
            if bool(rows.any()):
                out[rows] = self._normalize(cast(nn.BatchNorm1d, norm), x[rows],
                                            None if weights is None else weights[rows])
        return out

    @staticmethod
    def _normalize(norm: nn.BatchNorm1d, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if norm.training and x.shape[0] < 2 and norm.track_running_stats:
            # one cell of a domain in a batch has no batch statistics: its domain's running ones serve
            return nn.functional.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                            False, 0.0, norm.eps)
        if weights is not None and norm.training and bool(weights.sum() > 0):
            return weighted_batch_norm(norm, x, weights)
        return norm(x)


def weighted_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch norm in training with each row's weight in the batch's mean and variance (equal weights give
    BatchNorm1d's output); the running statistics move towards the weighted ones by the layer's momentum,
    the variance made unbiased with the weights' effective sample size."""
    w = (weights.float() / weights.float().sum().clamp_min(1e-12)).unsqueeze(1)
    xf = x.float()
    mean = (w * xf).sum(dim=0)
    var = (w * (xf - mean) ** 2).sum(dim=0)
    if norm.track_running_stats and norm.running_mean is not None and norm.running_var is not None:
        with torch.no_grad():
            n_effective = 1.0 / float((w ** 2).sum())
            unbiased = var * (n_effective / max(n_effective - 1.0, 1e-6))
            momentum = 0.1 if norm.momentum is None else norm.momentum
            norm.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            norm.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
    out = (xf - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        out = out * norm.weight + norm.bias
    return out.to(x.dtype)


def _norm_layer(n_features: int, batch_norm: bool, track_running_stats: bool, n_domains: int) -> nn.Module:
    if not batch_norm:
        return nn.Identity()
    if n_domains > 1:
        return DomainBatchNorm(n_features, n_domains, track_running_stats)
    return nn.BatchNorm1d(n_features, track_running_stats=track_running_stats)


def _normalize(norm: nn.Module, x: torch.Tensor, domain: Domain) -> torch.Tensor:
    return norm(x, domain) if isinstance(norm, DomainBatchNorm) else norm(x)


class HiddenBlock(nn.Module):
    """Linear -> BatchNorm -> Dropout -> ReLU."""

    def __init__(self, n_in: int, n_out: int, dropout: float, batch_norm: bool, track_running_stats: bool,
                 n_domains: int = 1):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.norm = _norm_layer(n_out, batch_norm, track_running_stats, n_domains)
        self.dropout = Dropout(dropout)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor | SparseRows, domain: Domain = None) -> torch.Tensor:
        return self.activation(self.dropout(_normalize(self.norm, linear(self.linear, x), domain)))


class ResidualBlock(nn.Module):
    """x -> ReLU(x + Dropout(BN(Linear(ReLU(BN(Linear(x)))))))."""

    def __init__(self, n_hidden: int, dropout: float, batch_norm: bool, track_running_stats: bool,
                 n_domains: int = 1):
        super().__init__()
        self.linear1 = nn.Linear(n_hidden, n_hidden)
        self.norm1 = _norm_layer(n_hidden, batch_norm, track_running_stats, n_domains)
        self.linear2 = nn.Linear(n_hidden, n_hidden)
        self.norm2 = _norm_layer(n_hidden, batch_norm, track_running_stats, n_domains)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, domain: Domain = None) -> torch.Tensor:
        inner = torch.relu(_normalize(self.norm1, self.linear1(x), domain))
        return torch.relu(x + self.dropout(_normalize(self.norm2, self.linear2(inner), domain)))


class CellTypeClassifier(nn.Module):
    """MLP classifier of cell identity.

    Parameters
    ----------
    n_genes
        Input genes.
    n_classes
        Output classes.
    n_hidden, n_layers
        Width and number of hidden layers (the first maps genes to ``n_hidden``).
    dropout
        Dropout in each hidden layer.
    init_dropout
        :class:`InputDropout` rate on the expression input.
    residual
        Hidden layers after the first are residual blocks.
    n_covariates
        Width of a one-hot appended to the input after input dropout (tissue-dependent models).
    n_norm_domains
        2: domain-specific batch norm (:class:`DomainBatchNorm`) for the reference (0) and the target (1);
        the ``domain`` argument of :meth:`forward` says which normalizes each row (default 0).
    depth_over_genes
        Re-express every input row per million over the model's genes (:func:`~.expression.rescale_to_genes`)
        before anything else, so that inputs normalized over other gene sets reach the layers on one scale.
    """

    def __init__(self, n_genes: int, n_classes: int, n_hidden: int = 256, n_layers: int = 2,
                 dropout: float = 0.5, init_dropout: float = 0.0, residual: bool = False,
                 batch_norm: bool = True, track_running_stats: bool = True, n_covariates: int = 0,
                 n_norm_domains: int = 1, depth_over_genes: bool = False):
        super().__init__()
        self.hyperparameters = dict(
            n_genes=n_genes, n_classes=n_classes, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout,
            init_dropout=init_dropout, residual=residual, batch_norm=batch_norm,
            track_running_stats=track_running_stats, n_covariates=n_covariates,
        )
        if n_norm_domains > 1:  # only then: manifests of models without it stay as they were
            self.hyperparameters["n_norm_domains"] = n_norm_domains
        if depth_over_genes:
            self.hyperparameters["depth_over_genes"] = True
        self.depth_over_genes = depth_over_genes
        self.n_genes, self.n_classes, self.n_hidden, self.n_covariates = n_genes, n_classes, n_hidden, n_covariates
        self.n_norm_domains = n_norm_domains
        self.input_dropout = InputDropout(init_dropout)
        norms: dict[str, Any] = dict(batch_norm=batch_norm, track_running_stats=track_running_stats, n_domains=n_norm_domains)
        blocks: list[nn.Module] = [HiddenBlock(n_genes + n_covariates, n_hidden, dropout, **norms)]
        for _ in range(n_layers - 1):
            blocks.append(ResidualBlock(n_hidden, dropout, **norms) if residual
                          else HiddenBlock(n_hidden, n_hidden, dropout, **norms))
        self.encoder = nn.Sequential(*blocks)
        self.classifier = nn.Linear(n_hidden, n_classes)

    def embed(self, x: torch.Tensor | SparseRows, covariates: Optional[torch.Tensor] = None,
              domain: Domain = None) -> torch.Tensor:
        """The cell embedding (last hidden layer).

        ``x`` may be :class:`~.sparse_input.SparseRows` in eval mode (prediction), its covariate one-hot already
        among its columns (after the genes).
        """
        if isinstance(x, SparseRows):
            if self.training and self.input_dropout.p > 0:
                raise ValueError("input dropout needs dense rows: sparse rows are for prediction (eval mode)")
            if covariates is not None:
                raise ValueError("sparse rows carry their covariates as columns after the genes")
            return self._encode(per_million(x, self.n_genes) if self.depth_over_genes else x, domain)
        dense = self.input_dropout(rescale_to_genes(x) if self.depth_over_genes else x)
        if self.n_covariates:
            if covariates is None or covariates.shape[1] != self.n_covariates:
                raise ValueError(f"this model needs a covariate one-hot of width {self.n_covariates}")
            dense = torch.cat([dense, covariates.to(dense.dtype)], dim=1)
        return self._encode(dense, domain)

    def _encode(self, x: torch.Tensor | SparseRows, domain: Domain) -> torch.Tensor:
        for block in self.encoder:
            x = block(x, domain)
        return cast(torch.Tensor, x)

    def forward(self, x: torch.Tensor, covariates: Optional[torch.Tensor] = None,
                return_embedding: bool = False, domain: Domain = None):
        embedding = self.embed(x, covariates, domain)
        logits = self.classifier(embedding)
        return (logits, embedding) if return_embedding else logits
