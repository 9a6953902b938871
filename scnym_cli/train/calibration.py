"""Temperature scaling: one scalar T fitted on the labeled cells a model was not fit on (train/trainer.py)
so that softmax(logits / T) means what it says (Guo et al. 2017). Accuracy is unchanged (argmax is).

T is the maximum a posteriori estimate under a standard normal prior on log T. Plain maximum likelihood
sends T to zero whenever every selection cell is classified right (sharper is then always likelier),
which a small selection split often is on easy data: the model then claims probability 1 for every call,
its errors on new cells get no probability at all, and models of one run (the folds) end up on scales
that cannot be compared. With the prior, a split that holds no evidence leaves T near 1 (the model's own
scale), while a few hundred cells with errors outweigh it."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


LOG_TEMPERATURE_PRIOR_SD = 1.0


# cells per step of the temperature's likelihood (see fit_temperature)
TEMPERATURE_CHUNK_ROWS = 65_536


def fit_temperature(logits: np.ndarray, codes: np.ndarray, max_iter: int = 200,
                    weights: Optional[np.ndarray] = None) -> float:
    """The T > 0 minimizing the negative log-likelihood of ``codes`` under softmax(logits / T) plus
    (log T)^2 / (2 sd^2), the log-density of the prior on log T. ``weights``: each cell's log-likelihood
    weighted (rescaled to mean 1, so the prior weighs as much as unweighted; importance-weighted calibration).

    Returns 1.0 when there is nothing to fit on (no cells, or a single class present).
    """
    if len(codes) < 2 or len(np.unique(codes)) < 2:
        return 1.0
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(codes, dtype=torch.long)
    w = None if weights is None else torch.as_tensor(np.asarray(weights) / np.mean(weights), dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        # the likelihood a chunk of cells at a time, each chunk's gradient added to log_t's: with 500,000
        # selection cells the whole batch's float64 temporaries (32 MB each, a dozen per evaluation) were a
        # 1.8 GB spike of the training process's peak memory
        optimizer.zero_grad()
        loss = log_t.square() / (2 * LOG_TEMPERATURE_PRIOR_SD ** 2)
        loss.backward()
        total = loss.detach()
        for start in range(0, len(y), TEMPERATURE_CHUNK_ROWS):
            rows = slice(start, start + TEMPERATURE_CHUNK_ROWS)
            if w is None:
                chunk = F.cross_entropy(z[rows] / log_t.exp(), y[rows], reduction="sum")
            else:
                chunk = (w[rows] * F.cross_entropy(z[rows] / log_t.exp(), y[rows], reduction="none")).sum()
            chunk.backward()
            total = total + chunk.detach()
        return total

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    return float(min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE))
