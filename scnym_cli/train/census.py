"""The census of target pseudolabels: the latest guess (class and confidence) of every target cell, from which
pseudolabel-balanced target batches and FlexMatch's per-class thresholds are computed every epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from ..nn.classifier import TARGET, CellTypeClassifier
from .inference import forward_rows
from .mixmatch import SemiSupervisedObjective

if TYPE_CHECKING:
    from ..data.batches import Sampler
    from .trainer import TrainingData


class TargetCensus:
    """The latest pseudolabel (class and confidence) of every target cell: what pseudolabel-balanced target
    batches and FlexMatch's per-class thresholds are computed from, at the start of every epoch.

    In one process the guesses MixMatch's teacher makes for each target batch are recorded as they come
    (no extra pass over the target; a cell not guessed yet has class -1). With several processes each
    sees only its share of every batch, so the census is a forward pass over every target cell at the
    start of each epoch instead, identical on every rank (all ranks must draw the same batches).
    """

    def __init__(self, objective: SemiSupervisedObjective, target_rows: np.ndarray, *, record: bool):
        self.objective = objective
        self.rows = np.asarray(target_rows)
        self.recording = record
        self.classes = np.full(len(self.rows), -1, dtype=np.int64)
        self.confidence = np.zeros(len(self.rows), dtype=np.float32)

    def record(self, rows: Optional[np.ndarray]) -> None:
        """Keep the guesses the objective's teacher made for these target rows in the step just taken."""
        guess = self.objective.last_guess
        if not self.recording or rows is None or guess is None:
            return
        positions = np.searchsorted(self.rows, rows)
        confidence, classes = guess.detach().float().max(dim=1)
        self.classes[positions] = classes.cpu().numpy()
        self.confidence[positions] = confidence.cpu().numpy()

    def refresh(self, model: CellTypeClassifier, data: "TrainingData", device: torch.device, epoch: int) -> None:
        """With several processes: predict every target cell now (from the second epoch on)."""
        if self.recording or epoch == 1:
            return
        outputs = forward_rows(model, data.X, self.rows, device, covariates=data.covariates, domain=TARGET)
        confidence, classes = torch.softmax(torch.from_numpy(outputs.logits), dim=1).max(dim=1)
        self.classes, self.confidence = classes.numpy(), confidence.numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "confidence": self.confidence}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = np.asarray(state["classes"], dtype=np.int64).copy()
        self.confidence = np.asarray(state["confidence"], dtype=np.float32).copy()

    def apply(self, target_sampler: "Sampler", n_rows: int) -> None:
        self.objective.update_census(self.classes, self.confidence)
        if self.objective.settings.balance_target_classes:
            pseudolabels = np.full(n_rows, -1, dtype=np.int64)
            pseudolabels[self.rows] = self.classes   # cells not guessed yet share the code -1
            target_sampler.balance_by(pseudolabels)
