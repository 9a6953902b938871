"""The one trainer shared by every command and the Python API.

It owns the loop: seeded batches from CSR rows, the optimizer and its schedule, mixed
precision on CUDA, per-epoch evaluation on the model-selection split, best-epoch tracking
with patience, the per-epoch CSV log and progress (:mod:`.progress`). What a step minimizes is the
objective's business (:mod:`.objectives`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import ScnymError
from ..data.batches import EpochSampler, batch_tensor
from ..data.disk import BlockShuffleSampler, DiskMatrix
from ..data.matrix import Matrix
from ..data.splits import Split
from ..nn.classifier import TARGET, CellTypeClassifier
from .device import Precision, flush_denormals, seeded_rng
from .inference import forward_rows
from .losses import inverse_frequency_weights
from .metrics import classification_metrics
from . import distributed
from .calibration import fit_temperature
from .mixmatch import SemiSupervisedObjective, UnlabeledBatch
from .objectives import LabeledBatch, Objective, SupervisedObjective
from .progress import EpochLog, EpochProgress
from .settings import TrainingSettings

log = logging.getLogger(__name__)

# set to 1 to check after every step that all ranks hold identical parameters (tests, debugging)
VERIFY_VARIABLE = "SCNYM_VERIFY_RANKS"

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


@dataclass
class TrainingData:
    """What a model trains on: the full normalized matrix and which rows play which part.

    Attributes
    ----------
    X
        ln(CPM + 1), cells x model genes, CSR.
    codes
        Class code of every row; -1 for cells without a label.
    split
        Rows to fit on, to select the best epoch on, and to hold out.
    covariates
        Optional one-hot per row appended to the input (tissue-dependent models).
    unlabeled
        Rows of target cells for semi-supervised training (MixMatch, domain adversary).
    domains
        Domain code of every row (for the domain adversary).
    """

    X: Matrix
    codes: np.ndarray
    split: Split
    n_classes: int
    covariates: Optional[np.ndarray] = None
    unlabeled: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    domains: Optional[np.ndarray] = None

    @property
    def n_domains(self) -> int:
        return 0 if self.domains is None else int(self.domains.max()) + 1

    def labeled_domains(self) -> int:
        """Distinct domains among the rows the model is fit on."""
        return 0 if self.domains is None else len(np.unique(self.domains[self.split.fit]))


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: pd.DataFrame = field(repr=False)
    temperature: float = 1.0
    semi_supervised: bool = False
    world_size: int = 1
    verified_steps: int = 0          # steps after which all ranks were checked to hold the same parameters


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

    def refresh(self, trainer: "Trainer", model: CellTypeClassifier, data: "TrainingData", epoch: int) -> None:
        """With several processes: predict every target cell now (from the second epoch on)."""
        if self.recording or epoch == 1:
            return
        outputs = forward_rows(model, data.X, self.rows, trainer.device, covariates=data.covariates, domain=TARGET)
        confidence, classes = torch.softmax(torch.from_numpy(outputs.logits), dim=1).max(dim=1)
        self.classes, self.confidence = classes.numpy(), confidence.numpy()

    def apply(self, target_sampler, n_rows: int) -> None:
        self.objective.update_census(self.classes, self.confidence)
        if self.objective.settings.balance_target_classes:
            pseudolabels = np.full(n_rows, -1, dtype=np.int64)
            pseudolabels[self.rows] = self.classes   # cells not guessed yet share the code -1
            target_sampler.balance_by(pseudolabels)


class Trainer:
    """Fit a model on :class:`TrainingData` as :class:`~.settings.TrainingSettings` say."""

    def __init__(self, settings: TrainingSettings, device: torch.device, *, log_path: Optional[Path] = None,
                 name: str = "model", show_progress: bool = True):
        self.settings, self.device, self.log_path, self.name = settings, device, log_path, name
        self.show_progress = show_progress

    # ------------------------------------------------------------------ pieces
    def _optimizer(self, objective: torch.nn.Module, steps_per_epoch: int):
        """The optimizer and its learning-rate schedule, stepped after every batch (None: constant)."""
        c = self.settings
        optimizer = OPTIMIZERS[c.optimizer](objective.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        schedule = {"auto": "cosine" if c.optimizer == "sgd" else "constant"}.get(c.lr_schedule, c.lr_schedule)
        if schedule == "constant":
            return optimizer, None
        shape = partial(LR_SCHEDULES[schedule], total_steps=max(c.n_epochs * steps_per_epoch, 1))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, shape)

    def _objective(self, model: CellTypeClassifier, data: TrainingData) -> Objective:
        """MixMatch / domain adversary when there is something to adapt to, else supervised."""
        c = self.settings
        class_weight = None
        if c.weight_classes:
            class_weight = inverse_frequency_weights(data.codes[data.split.fit], data.n_classes)
        has_target = len(data.unlabeled) > 0
        settings = c.semi_supervised
        mixmatch = has_target and settings.unsup_max_weight > 0
        adversary = settings.dan_max_weight > 0 and data.n_domains > 1 and (has_target or data.labeled_domains() > 1)
        if not (mixmatch or adversary):
            if has_target:
                log.info("%s: semi-supervision is off (unsup_max_weight and dan_max_weight are 0): target cells "
                         "are not used", self.name)
            return SupervisedObjective(model, class_weight=class_weight, mixup_alpha=c.mixup_alpha)
        if not adversary:
            settings = dataclasses.replace(settings, dan_max_weight=0.0)
        if not mixmatch:
            settings = dataclasses.replace(settings, unsup_max_weight=0.0)
        log.info("%s: %s on %d labeled and %d target cells", self.name,
                 " + ".join(n for n, on in (("MixMatch", mixmatch), ("domain adversary", adversary)) if on),
                 len(data.split.fit), len(data.unlabeled))
        prior = torch.bincount(torch.from_numpy(data.codes[data.split.fit]), minlength=data.n_classes)
        return SemiSupervisedObjective(model, settings, max(data.n_domains, 2), class_weight, labeled_prior=prior)

    def _sampler(self, data: TrainingData, rows: np.ndarray, *, balance_classes: bool, seed: int,
                 min_batches: int = 0):
        """Shuffled batches; for data read from disk, shuffled within windows of blocks (bounded memory)."""
        c = self.settings
        if isinstance(data.X, DiskMatrix):
            window = max(1, c.read_buffer_cells // data.X.block_rows)
            return BlockShuffleSampler(rows, c.batch_size, data.X, window_blocks=window, codes=data.codes,
                                       balance_classes=balance_classes, seed=seed, min_batches=min_batches)
        return EpochSampler(rows, c.batch_size, codes=data.codes, balance_classes=balance_classes, seed=seed,
                            min_batches=min_batches)

    def _rows_to_device(self, array: Optional[np.ndarray], rows: np.ndarray) -> Optional[torch.Tensor]:
        return None if array is None else torch.from_numpy(array[rows]).to(self.device)

    def _labeled_batch(self, data: TrainingData, rows: np.ndarray) -> LabeledBatch:
        x = batch_tensor(data.X, rows, self.device)
        target = F.one_hot(torch.from_numpy(data.codes[rows]), data.n_classes).float().to(self.device)
        return LabeledBatch(x, target, self._rows_to_device(data.covariates, rows),
                            self._rows_to_device(data.domains, rows))

    def _unlabeled_batch(self, data: TrainingData, rows: np.ndarray) -> UnlabeledBatch:
        return UnlabeledBatch(batch_tensor(data.X, rows, self.device), self._rows_to_device(data.domains, rows),
                              self._rows_to_device(data.covariates, rows))

    def _evaluate(self, model: CellTypeClassifier, data: TrainingData) -> dict[str, float]:
        rows = data.split.select
        if len(rows) == 0:
            return {"select_loss": float("nan"), "select_accuracy": float("nan"),
                    "select_balanced_accuracy": float("nan")}
        outputs = forward_rows(model, data.X, rows, self.device, covariates=data.covariates)
        truth = data.codes[rows]
        logits = torch.from_numpy(outputs.logits)
        loss = float(F.cross_entropy(logits, torch.from_numpy(truth)))
        metrics = classification_metrics(truth, outputs.logits.argmax(1))
        return {"select_loss": loss, "select_accuracy": metrics["accuracy"],
                "select_balanced_accuracy": metrics["balanced_accuracy"]}

    def _score(self, evaluation: dict[str, float], metric: str) -> float:
        """Higher is better, whatever the metric."""
        if metric == "last":
            return math.inf
        value = evaluation["select_loss"] if metric == "loss" else evaluation[f"select_{metric}"]
        if math.isnan(value):
            return -math.inf
        return -value if metric == "loss" else value

    # ------------------------------------------------------------------ loop
    def fit(self, model: CellTypeClassifier, data: TrainingData) -> FitResult:
        """Train ``model`` in place; on return it holds the weights of the best epoch.

        Every random choice (sampling order, dropout, MixUp) comes from ``settings.seed``; the
        caller's global torch RNG state is left as it was.
        """
        c = self.settings
        with seeded_rng(c.seed), flush_denormals():
            return self._fit(model, data)

    def _fit(self, model: CellTypeClassifier, data: TrainingData) -> FitResult:
        c = self.settings
        model.to(self.device)
        objective = self._objective(model, data).to(self.device)
        semi_supervised = isinstance(objective, SemiSupervisedObjective)
        adapting = semi_supervised and len(data.unlabeled) > 0
        sampler = self._sampler(data, data.split.fit, balance_classes=c.balances_labeled_classes(adapting),
                                seed=c.seed, min_batches=c.min_steps_per_epoch)
        optimizer, scheduler = self._optimizer(objective, max(len(sampler), 1))
        precision = Precision(self.device)
        ranks = distributed.current()
        step: torch.nn.Module = objective
        if ranks.active:  # gradients averaged across ranks by PyTorch's DistributedDataParallel
            from torch.nn.parallel import DistributedDataParallel

            step = DistributedDataParallel(objective, device_ids=[self.device] if self.device.type == "cuda" else None)
            if c.batch_size < 2 * ranks.world_size:
                raise ScnymError(f"--batch_size {c.batch_size} is too small for {ranks.world_size} processes: each "
                                 "needs at least 2 cells per batch")
        verify = ranks.active and os.environ.get(VERIFY_VARIABLE, "") == "1"
        verified_steps = 0
        target_sampler = target_batches = None
        if semi_supervised and len(data.unlabeled):
            target_sampler = self._sampler(data, data.unlabeled, balance_classes=False, seed=c.seed + 1)
            target_batches = target_sampler.forever()
        census = None
        if isinstance(objective, SemiSupervisedObjective) and target_sampler is not None \
                and objective.settings.needs_target_census:
            census = TargetCensus(objective, data.unlabeled, record=not ranks.active)
        min_epochs = min(c.min_epochs, c.n_epochs)
        # the selection loss picks the kept epoch with or without target cells: keeping the last epoch of a
        # semi-supervised run let B cells drift into T/NK cells on the 10k-gene V2 split (0.974 against 0.991
        # balanced accuracy; bench/results/ablation.md)
        selection = c.selection_metric
        best_score, best_epoch, best_state = -math.inf, 0, None
        epoch_log = EpochLog(self.log_path)
        started = time.perf_counter()
        stopped_early, epoch = False, 0
        try:
            with EpochProgress(self.name, c.n_epochs, self.show_progress) as progress:
                for epoch in range(1, c.n_epochs + 1):
                    epoch_started = time.perf_counter()
                    objective.train()
                    totals: dict[str, float] = {}
                    n_seen, n_correct = 0, 0
                    if census is not None:
                        census.refresh(self, model, data, epoch)
                        census.apply(target_sampler, data.X.shape[0])
                    steps_per_epoch = max(len(sampler), 1)
                    for step_index, global_rows in enumerate(sampler.epoch()):
                        # every rank draws the same global batch and takes its share of it
                        rows = global_rows[ranks.rank::ranks.world_size]
                        batch = self._labeled_batch(data, rows)
                        target = target_rows = None
                        if target_batches is not None:
                            target_rows = next(target_batches)[ranks.rank::ranks.world_size]
                            target = self._unlabeled_batch(data, target_rows)
                        optimizer.zero_grad(set_to_none=True)
                        with precision.autocast():
                            loss, terms, logits = step(batch, epoch + step_index / steps_per_epoch, target)
                        precision.scaler.scale(loss).backward()
                        precision.scaler.step(optimizer)
                        precision.scaler.update()
                        if scheduler is not None:
                            scheduler.step()
                        objective.after_step()
                        if census is not None:
                            census.record(target_rows)
                        if verify:
                            if not distributed.parameters_identical(objective):
                                raise RuntimeError(f"{self.name}: parameters differ between ranks after step "
                                                   f"{verified_steps + 1}")
                            verified_steps += 1
                        n = len(rows)
                        n_seen += n
                        n_correct += int((logits.argmax(1) == batch.target.argmax(1)).sum())
                        totals["train_loss"] = totals.get("train_loss", 0.0) + float(loss.detach()) * n
                        for key, value in terms.items():
                            totals[key] = totals.get(key, 0.0) + value * n
                    learning_rate = optimizer.param_groups[0]["lr"]
                    distributed.sync_buffers(model)  # identical models, identical evaluations on every rank
                    evaluation = self._evaluate(model, data)
                    score = self._score(evaluation, selection)
                    is_best = distributed.agree(epoch >= min_epochs and (score > best_score or selection == "last"))
                    if is_best:
                        best_score, best_epoch = score, epoch
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    row = {"epoch": epoch, "lr": learning_rate,
                           **{k: v / max(n_seen, 1) for k, v in totals.items()},
                           "train_accuracy": n_correct / max(n_seen, 1), **evaluation,
                           "is_best": is_best, "seconds": time.perf_counter() - epoch_started}
                    epoch_log.write(row)
                    progress.update(epoch, row["train_loss"], evaluation["select_accuracy"], best_epoch)
                    if not math.isfinite(row["train_loss"]):
                        raise ScnymError(f"{self.name}: the training loss became {row['train_loss']} at epoch "
                                         f"{epoch}; lower --lr or check the input values")
                    if distributed.agree(bool(c.patience and selection != "last" and epoch >= min_epochs
                                              and best_epoch and epoch - best_epoch >= c.patience)):
                        stopped_early = True
                        break
        finally:
            history = epoch_log.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        else:  # no epoch could be scored (no selection split): keep the last one
            best_epoch = epoch
        temperature = self._calibrate(model, data) if c.calibrate else 1.0
        seconds = time.perf_counter() - started
        kept = ("the last" if selection == "last" else
                f"best by {selection} {abs(best_score):.4f}" if math.isfinite(best_score) else "no selection")
        log.info("%s: kept epoch %d of %d (%s)%s, temperature %.3f, %.1f s", self.name, best_epoch, epoch, kept,
                 ", stopped early" if stopped_early else "", temperature, seconds)
        if selection == "last":
            best_score = float("nan")
        return FitResult(best_epoch, best_score, epoch, stopped_early, seconds, history, temperature,
                         semi_supervised, ranks.world_size, verified_steps)

    def _calibrate(self, model: CellTypeClassifier, data: TrainingData) -> float:
        """Temperature that makes the best model's confidences calibrated on every labeled cell it was not
        fit on: the selection split, and a fold's held-out cells. The selection split alone is small (a few
        hundred cells, often all classified right on easy data), and fold models whose temperatures rest on
        so few cells land on scales too different for one pooled conformal calibration (train/conformal.py)."""
        rows = np.sort(np.concatenate([data.split.select, data.split.held_out]))
        if len(rows) == 0:
            return 1.0
        outputs = forward_rows(model, data.X, rows, self.device, covariates=data.covariates)
        return fit_temperature(outputs.logits, data.codes[rows])
