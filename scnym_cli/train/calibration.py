"""Temperature scaling: one scalar T fitted on the model-selection split so that
softmax(logits / T) means what it says (Guo et al. 2017). Accuracy is unchanged (argmax is)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: np.ndarray, codes: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 minimizing the negative log-likelihood of ``codes`` under softmax(logits / T).

    Returns 1.0 when there is nothing to fit on (no cells, or a single class present).
    """
    if len(codes) < 2 or len(np.unique(codes)) < 2:
        return 1.0
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(codes, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    return float(min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE))
