"""One training run's models predicting together: the cross-validation folds and all_data.

A k-fold run trains k fold models beside the final all_data model. Averaging their calibrated
probabilities (``--ensemble all``, the default) uses all of that work: the models differ in the cells
they were fit on and in their initial weights, and where they disagree the average is less sure. The
fold models' out-of-fold predictions are also the calibration set of conformal prediction sets
(train/conformal.py): cells no fold model was fit on, as many as the reference has labeled cells.

Every member reads the same block of cells (aligned once); the embedding, logits and novelty come from
one model, the primary (all_data, also with ``--ensemble folds``), since the members' embedding spaces
are their own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import ScnymError
from ..nn.classifier import REFERENCE, TARGET
from ..store import ALL_DATA_DIR, MANIFEST_FILE, LoadedModel, load_calibration, load_model
from ..train.conformal import ConformalCalibration, CrossConformal
from ..train.inference import forward_rows
from ..train.novelty import NoveltyReference

log = logging.getLogger(__name__)

ENSEMBLE_CHOICES = ("all", "all_data", "folds")
# fewer calibration cells than this cannot weigh a query's shift (a model directory given without its run)
MIN_SHIFT_CELLS = 50


@dataclass
class EnsembleOutputs:
    probabilities: np.ndarray             # cells x classes, the members' calibrated probabilities averaged
    logits: np.ndarray                    # the primary member's
    embedding: Optional[np.ndarray]       # the primary member's
    disagreement: Optional[np.ndarray]    # share of members whose own call differs (None: one member)
    fold_probabilities: Optional[list[np.ndarray]] = None   # each fold model's, in fold order (cross-conformal)


def is_run_directory(path: Path) -> bool:
    """A training run (its models in subfolders), as opposed to one model's directory or files."""
    path = Path(path)
    return path.is_dir() and not (path / MANIFEST_FILE).is_file() and (path / ALL_DATA_DIR / MANIFEST_FILE).is_file()


def run_folds(path: Path) -> tuple[list[Path], Optional[str]]:
    """The fold directories of the run at ``path`` and, if one is missing or from another run, why.

    The folds are those the run's all_data manifest says it trained (n_folds), each checked to come from the
    same run: a stale fold folder left by an earlier run is never used.
    """
    final = json.loads((path / ALL_DATA_DIR / MANIFEST_FILE).read_text())
    n_folds = int((final.get("config") or {}).get("n_folds") or 0)
    folds = [path / f"fold{k:02d}" for k in range(n_folds)]
    job = (final.get("data_fingerprint") or {}).get("job")
    for fold in folds:
        if not (fold / MANIFEST_FILE).is_file():
            return folds, f"{fold} is missing from the {n_folds}-fold run {path}; finish it (scnym collect_folds)"
        fold_job = (json.loads((fold / MANIFEST_FILE).read_text()).get("data_fingerprint") or {}).get("job")
        if fold_job != job:
            return folds, (f"{fold} comes from another training run than {path / ALL_DATA_DIR} (other data or "
                           "settings); retrain the run")
    return folds, None


def member_directories(path: Path, choice: str) -> tuple[list[Path], list[Path]]:
    """(members, the run's fold directories) for ``--ensemble choice``; a model's own path for one model.
    Folds that are missing or from another run stop any choice but all_data (which then calibrates prediction
    sets on its own model-selection cells)."""
    path = Path(path)
    if choice not in ENSEMBLE_CHOICES:
        raise ScnymError(f"--ensemble {choice!r}: choose one of {', '.join(ENSEMBLE_CHOICES)}")
    if not is_run_directory(path):
        if choice == "folds":
            raise ScnymError(f"--ensemble folds needs a training run directory with cross-validation folds; "
                             f"--model_path {path} is one model (give its run directory, or --ensemble all_data)")
        return [path], []
    folds, problem = run_folds(path)
    if problem and choice == "all_data":
        log.warning("%s: prediction sets are calibrated on all_data's model-selection cells", problem)
        return [path / ALL_DATA_DIR], []
    if problem:
        raise ScnymError(f"{problem}, or predict with --ensemble all_data")
    if choice == "folds" and not folds:
        raise ScnymError(f"--ensemble folds: the run {path} has no cross-validation folds (n_folds 0); use "
                         "--ensemble all_data")
    members = {"all": [*folds, path / ALL_DATA_DIR], "all_data": [path / ALL_DATA_DIR], "folds": folds}[choice]
    return members, folds


class Ensemble:
    """The models of one run chosen by ``--ensemble``, with the run's conformal calibration set.

    The primary model -- all_data in a run (predicting or not), else the one model -- gives the embedding,
    the logits and the novelty, and weighs calibration cells for weighted prediction sets.
    """

    def __init__(self, path: Path, choice: str, device, dtype: torch.dtype = torch.float32, *,
                 cross_conformal: bool = False):
        """``cross_conformal``: prediction sets are wanted (unweighted), so each block's outputs carry every fold
        model's own probabilities when all of them predict."""
        self.path, self.dtype = Path(path), dtype   # dtype: of the matrix products (--inference_precision)
        directories, folds = member_directories(path, choice)
        final = [self.path / ALL_DATA_DIR] if is_run_directory(self.path) else []
        loaded = {d: load_model(d, device) for d in dict.fromkeys([*directories, *final])}
        self.members: list[LoadedModel] = [loaded[d] for d in directories]
        self.primary = loaded[final[0]] if final else self.members[0]
        for member in self.members:
            if member.genes != self.primary.genes or member.classes != self.primary.classes:
                raise ScnymError(f"{member.directory} and {self.primary.directory} have other genes or classes; "
                                 "they are not models of one run")
        # calibration: cells none of the calibrating models was fit on -- the folds' held-out cells when the
        # run has folds (whichever members predict), else the model's own model-selection cells
        parts = [loaded[d].calibration if d in loaded else load_calibration(d) for d in folds] \
            or [self.primary.calibration]
        present = [p for p in parts if p is not None]
        self.calibration: Optional[ConformalCalibration] = (
            ConformalCalibration.concatenate(present) if len(present) == len(parts) else None)
        self.calibration_source = "out-of-fold cells of the folds" if folds else "model-selection cells"
        # when every fold model predicts, sets rank each fold model's scores among its own held-out cells'
        # (cross-conformal); otherwise the pooled calibration set serves whichever model predicts
        self.cross_conformal: Optional[CrossConformal] = None
        if cross_conformal and folds and all(d in directories for d in folds) and self.calibration is not None:
            self.cross_conformal = CrossConformal.from_folds(present)
        # which members are the fold models (members hold them in fold order)
        self.fold_members = frozenset(directories.index(d) for d in folds) if self.cross_conformal else frozenset()

    def shift_reference(self) -> tuple[ConformalCalibration, np.ndarray]:
        """(the calibration cells the primary model embedded at training, their embedding): what a query is
        compared with for weighted prediction sets."""
        shift = self.primary.calibration.shift if self.primary.calibration is not None else None
        calibration = self.calibration
        rows = calibration.rows if calibration is not None else None
        if shift is None or calibration is None or rows is None:
            raise ScnymError(f"--weighted_sets needs a run trained by this scnym (its all_data model keeps a sample "
                             f"of calibration cells); {self.path} has none: retrain it, or leave --weighted_sets off")
        inside = np.isin(shift.rows, rows)
        if inside.sum() < MIN_SHIFT_CELLS:
            raise ScnymError(f"--weighted_sets: {self.path} holds {int(inside.sum())} calibration cells embedded by "
                             f"its final model (at least {MIN_SHIFT_CELLS} are needed); give the training run "
                             "directory rather than one model's")
        return calibration.subset(shift.rows[inside]), shift.embedding[inside]

    @property
    def genes(self) -> list[str]:
        return self.primary.genes

    @property
    def classes(self) -> list[str]:
        return self.primary.classes

    @property
    def novelty(self) -> Optional[NoveltyReference]:
        return self.primary.novelty

    @property
    def directory(self) -> Path:
        return self.primary.directory

    @property
    def manifest(self) -> dict:
        return self.primary.manifest

    @property
    def n_hidden(self) -> int:
        return self.primary.model.n_hidden

    @property
    def names(self) -> list[str]:
        return [m.directory.name for m in self.members]

    def embed(self, X, device, *, covariates: Optional[np.ndarray]) -> np.ndarray:
        """The primary model's embedding of a block."""
        return _forward(self.primary, X, device, covariates, True, self.dtype).embedding

    def predict(self, X, device, *, covariates: Optional[np.ndarray],
                with_embedding: bool) -> EnsembleOutputs:
        """Every member on the same block (ln(CPM+1) over the model's genes)."""
        total: Optional[np.ndarray] = None
        calls = []
        logits = embedding = None

        def forward(model: LoadedModel, embed: bool):
            return _forward(model, X, device, covariates, embed, self.dtype)

        fold_probabilities: Optional[list[np.ndarray]] = [] if self.cross_conformal is not None else None
        for index, member in enumerate(self.members):
            primary = member is self.primary
            outputs = forward(member, with_embedding and primary)
            probabilities = outputs.probabilities(member.temperature)
            if fold_probabilities is not None and index in self.fold_members:
                fold_probabilities.append(probabilities)
            total = probabilities if total is None else total + probabilities
            calls.append(probabilities.argmax(axis=1))
            if primary:
                logits, embedding = outputs.logits, outputs.embedding
        if logits is None:   # --ensemble folds: the final model still gives the embedding and the logits
            outputs = forward(self.primary, with_embedding)
            logits, embedding = outputs.logits, outputs.embedding
        if total is None:
            raise ValueError(f"{self.path}: an ensemble without members")
        probabilities = total / len(self.members)
        disagreement = None
        if len(self.members) > 1:
            disagreement = (np.stack(calls) != probabilities.argmax(axis=1)).mean(axis=0).astype(np.float32)
        return EnsembleOutputs(probabilities.astype(np.float32), logits, embedding, disagreement, fold_probabilities)


def _forward(model: LoadedModel, X, device, covariates: Optional[np.ndarray], embed: bool, dtype: torch.dtype):
    # a model with domain-specific batch norm predicts with the target's statistics: it was adapted to it;
    # the block passes through the model in forward_rows' own chunks (FORWARD_ROWS), whatever its size
    return forward_rows(model.model, X, None, device, covariates=covariates,
                        with_embedding=embed, domain=TARGET if model.model.n_norm_domains > 1 else REFERENCE,
                        dtype=dtype)
