"""The optimizer and its learning-rate schedule (stepped after every batch)."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable, Optional

import torch

from .settings import TrainingSettings

OPTIMIZERS: dict[str, Callable] = {
    "adadelta": torch.optim.Adadelta,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9),
}


def one_cycle(step: int, total_steps: int, warmup: float = 0.3, start: float = 1 / 25, end: float = 1e-5) -> float:
    """Learning-rate factor of the one-cycle policy (Smith & Topin 2019): a cosine warm-up from ``start`` to
    1 over the first ``warmup`` share of the steps, then a cosine decay to ``end``; flat after the last step."""
    t = min(step / total_steps, 1.0)
    if t < warmup:
        return start + (1 - start) * (1 - math.cos(math.pi * t / warmup)) / 2
    return end + (1 - end) * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup))) / 2


def cosine(step: int, total_steps: int) -> float:
    """Cosine annealing from 1 to 1e-4 over the run."""
    return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * min(step / total_steps, 1.0))) / 2


LR_SCHEDULES: dict[str, Callable[..., float]] = {"one_cycle": one_cycle, "cosine": cosine}


def build_optimizer(settings: TrainingSettings, parameters: Iterable[torch.nn.Parameter], steps_per_epoch: int
                    ) -> tuple[torch.optim.Optimizer, Optional[torch.optim.lr_scheduler.LambdaLR]]:
    """The optimizer and its learning-rate schedule over the run's steps (None: a constant rate)."""
    c = settings
    optimizer = OPTIMIZERS[c.optimizer](parameters, lr=c.lr, weight_decay=c.weight_decay)
    schedule = {"auto": "cosine" if c.optimizer == "sgd" else "constant"}.get(c.lr_schedule, c.lr_schedule)
    if schedule == "constant":
        return optimizer, None
    shape = partial(LR_SCHEDULES[schedule], total_steps=max(c.n_epochs * steps_per_epoch, 1))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
