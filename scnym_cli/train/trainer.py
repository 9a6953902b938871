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
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import RunInterrupted, ScnymError
from ..data.batches import BatchStream, EpochSampler, batch_tensor
from ..data.disk import BlockShuffleSampler, DiskMatrix
from ..data.matrix import Matrix
from ..data.splits import Split
from ..nn.classifier import CellTypeClassifier
from .device import Precision, flush_denormals, seeded_rng
from .inference import forward_rows
from .losses import inverse_frequency_weights
from .metrics import classification_metrics
from . import distributed
from .averaging import averaged_classifier, weight_average
from .calibration import fit_temperature
from .census import TargetCensus
from .checkpoint import (CheckpointPolicy, StopRequest, kill_point, load_checkpoint, save_checkpoint,
                         set_torch_rng_state, torch_rng_state)
from .mixmatch import SemiSupervisedObjective, UnlabeledBatch
from .objectives import LabeledBatch, Objective, SupervisedObjective
from .optim import build_optimizer
from .progress import EpochLog, EpochProgress
from .settings import TrainingSettings

log = logging.getLogger(__name__)

# set to 1 to check after every step that all ranks hold identical parameters (tests, debugging)
VERIFY_VARIABLE = "SCNYM_VERIFY_RANKS"

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


@dataclass
class LoopState:
    """Where the epoch loop stands (what a checkpoint restores besides the modules and generators)."""

    epoch: int = 0                         # the last epoch completed
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: Optional[dict[str, torch.Tensor]] = None
    stopped_early: bool = False
    verified_steps: int = 0
    seconds: float = 0.0                   # training time before this process (a resumed run)

    @classmethod
    def restore(cls, saved: dict[str, Any]) -> "LoopState":
        return cls(**saved)


class Trainer:
    """Fit a model on :class:`TrainingData` as :class:`~.settings.TrainingSettings` say.

    With a ``checkpoint`` policy the fit writes checkpoints as it goes (train/checkpoint.py) and, when one is
    there already, goes on from it; removing it once the model is safe is the caller's business.
    """

    def __init__(self, settings: TrainingSettings, device: torch.device, *, log_path: Optional[Path] = None,
                 name: str = "model", show_progress: bool = True, checkpoint: Optional[CheckpointPolicy] = None):
        self.settings, self.device, self.log_path, self.name = settings, device, log_path, name
        self.show_progress = show_progress
        self.checkpoint = checkpoint

    # ------------------------------------------------------------------ pieces
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
        optimizer, scheduler = build_optimizer(c, objective.parameters(), max(len(sampler), 1))
        # with weight averaging, the moving average is what each epoch evaluates and what the run keeps
        averaged = weight_average(model, c.weight_averaging) if c.weight_averaging > 0 else None
        kept_model = model if averaged is None else averaged_classifier(averaged)
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
        target_sampler = target_batches = None
        if semi_supervised and len(data.unlabeled):
            target_sampler = self._sampler(data, data.unlabeled, balance_classes=False, seed=c.seed + 1)
            target_batches = BatchStream(target_sampler)
        census = None
        if isinstance(objective, SemiSupervisedObjective) and target_sampler is not None \
                and objective.settings.needs_target_census:
            census = TargetCensus(objective, data.unlabeled, record=not ranks.active)
        min_epochs = min(c.min_epochs, c.n_epochs)
        # the selection loss picks the kept epoch with or without target cells: keeping the last epoch of a
        # semi-supervised run let B cells drift into T/NK cells on the 10k-gene V2 split (0.974 against 0.991
        # balanced accuracy; bench/results/ablation.md)
        selection = c.selection_metric
        loop = LoopState()
        epoch_log = EpochLog(self.log_path)
        # checkpoints are per process: a data-parallel run (several ranks) is not checkpointed
        checkpoint = self.checkpoint if self.checkpoint is not None and self.checkpoint.enabled \
            and not ranks.active else None

        def snapshot() -> dict[str, Any]:
            return {"name": self.name, "loop": dataclasses.asdict(loop), "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "scaler": precision.scaler.state_dict(), "rng": torch_rng_state(),
                    "sampler": sampler.state_dict(),
                    "target": None if target_batches is None else target_batches.state_dict(),
                    "census": None if census is None else census.state_dict(), "log": epoch_log.rows,
                    "averaged": None if averaged is None else averaged.state_dict(), "epoch": loop.epoch}

        if checkpoint is not None and (saved := load_checkpoint(checkpoint, self.name)) is not None:
            objective.load_state_dict(saved["objective"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            precision.scaler.load_state_dict(saved["scaler"])
            set_torch_rng_state(saved["rng"])
            sampler.load_state_dict(saved["sampler"])
            if target_batches is not None:
                target_batches.load_state_dict(saved["target"])
            if census is not None:
                census.load_state_dict(saved["census"])
            if averaged is not None:
                if saved.get("averaged") is None:
                    raise ScnymError(f"{self.name}: the checkpoint was written without --weight_averaging; "
                                     "resume with the settings it was started with")
                averaged.load_state_dict(saved["averaged"])
            loop = LoopState.restore(saved["loop"])
            epoch_log.restore(saved["log"])
            log.info("%s: resumed from the checkpoint of epoch %d", self.name, loop.epoch)
        started = time.perf_counter() - loop.seconds
        last_checkpoint = time.perf_counter()
        try:
            with EpochProgress(self.name, c.n_epochs, self.show_progress, done=loop.epoch) as progress:
                for epoch in range(loop.epoch + 1, c.n_epochs + 1):
                    epoch_started = time.perf_counter()
                    objective.train()
                    totals: dict[str, float] = {}
                    n_seen, n_correct = 0, 0
                    if census is not None and target_sampler is not None:
                        census.refresh(model, data, self.device, epoch)
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
                        if averaged is not None:
                            averaged.update_parameters(model)
                        if census is not None:
                            census.record(target_rows)
                        if verify:
                            if not distributed.parameters_identical(objective):
                                raise RuntimeError(f"{self.name}: parameters differ between ranks after step "
                                                   f"{loop.verified_steps + 1}")
                            loop.verified_steps += 1
                        n = len(rows)
                        n_seen += n
                        n_correct += int((logits.argmax(1) == batch.target.argmax(1)).sum())
                        totals["train_loss"] = totals.get("train_loss", 0.0) + float(loss.detach()) * n
                        for key, value in terms.items():
                            totals[key] = totals.get(key, 0.0) + value * n
                    learning_rate = optimizer.param_groups[0]["lr"]
                    distributed.sync_buffers(model)  # identical models, identical evaluations on every rank
                    if averaged is not None:
                        distributed.sync_buffers(kept_model)
                    evaluation = self._evaluate(kept_model, data)
                    score = self._score(evaluation, selection)
                    is_best = distributed.agree(epoch >= min_epochs
                                                and (score > loop.best_score or selection == "last"))
                    loop.epoch = epoch
                    if is_best:
                        loop.best_score, loop.best_epoch = score, epoch
                        loop.best_state = {k: v.detach().clone() for k, v in kept_model.state_dict().items()}
                    row = {"epoch": epoch, "lr": learning_rate,
                           **{k: v / max(n_seen, 1) for k, v in totals.items()},
                           "train_accuracy": n_correct / max(n_seen, 1), **evaluation,
                           "is_best": is_best, "seconds": time.perf_counter() - epoch_started}
                    epoch_log.write(row)
                    progress.update(epoch, row["train_loss"], evaluation["select_accuracy"], loop.best_epoch)
                    if not math.isfinite(row["train_loss"]):
                        raise ScnymError(f"{self.name}: the training loss became {row['train_loss']} at epoch "
                                         f"{epoch}; lower --lr or check the input values")
                    if distributed.agree(bool(c.patience and selection != "last" and epoch >= min_epochs
                                              and loop.best_epoch and epoch - loop.best_epoch >= c.patience)):
                        loop.stopped_early = True
                        break
                    kill_point("epoch_end", self.name, epoch)
                    stop = StopRequest.signal_name
                    if checkpoint is not None and epoch < c.n_epochs and (
                            stop or checkpoint.due(epoch, time.perf_counter() - last_checkpoint)):
                        loop.seconds = time.perf_counter() - started
                        save_checkpoint(checkpoint, snapshot(), self.name)
                        last_checkpoint = time.perf_counter()
                    if stop:
                        raise RunInterrupted(
                            f"{self.name}: stopped by {stop} after epoch {epoch}"
                            + ("; its checkpoint is written: continue the run with --resume true"
                               if checkpoint is not None else " (a data-parallel run has no checkpoints)"))
        finally:
            history = epoch_log.close()
        epoch, best_epoch, best_score = loop.epoch, loop.best_epoch, loop.best_score
        if loop.best_state is not None:
            model.load_state_dict(loop.best_state)
        else:  # no epoch could be scored (no selection split): keep the last one
            best_epoch = epoch
            if averaged is not None:
                model.load_state_dict(kept_model.state_dict())
        temperature = self._calibrate(model, data) if c.calibrate else 1.0
        seconds = time.perf_counter() - started
        kept = ("the last" if selection == "last" else
                f"best by {selection} {abs(best_score):.4f}" if math.isfinite(best_score) else "no selection")
        log.info("%s: kept epoch %d of %d (%s)%s, temperature %.3f, %.1f s", self.name, best_epoch, epoch, kept,
                 ", stopped early" if loop.stopped_early else "", temperature, seconds)
        if selection == "last":
            best_score = float("nan")
        return FitResult(best_epoch, best_score, epoch, loop.stopped_early, seconds, history, temperature,
                         semi_supervised, ranks.world_size, loop.verified_steps)

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
