"""Cross-validated training: k stratified folds plus a final all_data model, written atomically.

Output layout (``out_path``)::

    celltype_label.csv, fold_eval_acc.csv, fold_eval_losses.csv, confusion_matrix.{csv,png},
    scnym_config.json, run_summary.json (written last: the run is complete)
    fold00/ ... foldNN/, all_data/   one model directory each (see :func:`train_one_model`)

Resumable: each model directory is written beside its place and moved there whole (one that exists is
finished), the model in training keeps a checkpoint (train/checkpoint.py), and the run's identity (settings
and data) is recorded, so that ``--resume`` continues a killed run exactly (staging.py keeps it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..card import write_model_card
from ..config import Config
from ..data.splits import Split, all_data_split, cross_validation_splits
from ..errors import ScnymError
from ..nn import CellTypeClassifier
from ..report import EMBEDDING_MAP_FILE, MAP_CELLS, plot_training_curve, predictions_table, principal_components
from ..staging import CHECKPOINT_DIR, INTERNAL_PREFIX, staged_directory
from ..store import ALL_DATA_DIR, data_fingerprint, file_sha256, save_model
from ..train import Trainer, TrainingData
from ..train.conformal import CONFORMAL_FILE, SHIFT_REFERENCE_CELLS, ConformalCalibration, ShiftReference
from ..train.checkpoint import CheckpointPolicy, kill_point, remove_checkpoint, stop_on_signals
from ..train.device import seeded_rng
from ..train.inference import embed_rows, forward_rows
from ..train.metrics import classification_metrics, expected_calibration_error
from ..train.novelty import NOVELTY_FILE, SELECTION_CELLS, NoveltyReference, bank_rows
from .collect import RUN_MARKER, model_complete, summarize_run
from .inputs import TrainingInputs, load_training_inputs
from .runtime import resuming, setup_runtime, writes_outputs
from .settings import training_settings

log = logging.getLogger(__name__)

PROTECTED_OUTPUTS = (RUN_MARKER, ALL_DATA_DIR, "fold_eval_acc.csv")
# every entry a whole training run writes (fold jobs write only their own folder)
RUN_OUTPUTS = ("fold[0-9][0-9]", ALL_DATA_DIR, "fold_eval_acc.csv", "fold_eval_losses.csv", "per_class_metrics.csv",
               "confusion_matrix.*", "reliability.csv", "reliability_diagram.png", RUN_MARKER, "celltype_label.csv",
               "scnym_config.json", "README.md", "report.html")


@dataclass
class ModelResult:
    name: str
    best_epoch: int
    epochs_run: int
    seconds: float
    metrics: dict[str, float]          # on the held-out cells (empty for all_data)
    held_out_loss: float
    predictions: pd.DataFrame          # cell_id, split, true_label, predicted_label, confidence, prob_*


def build_model(config: Config, n_genes: int, n_classes: int, n_covariates: int = 0,
                has_target: bool = False) -> CellTypeClassifier:
    """The classifier with weights initialized from ``config.seed`` (global RNG state untouched); batch norm
    specific to reference and target with ``domain_batch_norm`` and target cells."""
    with seeded_rng(config.seed):
        return CellTypeClassifier(
            n_genes=n_genes, n_classes=n_classes, n_hidden=config.n_hidden, n_layers=config.n_layers,
            dropout=config.dropout, init_dropout=config.init_dropout, residual=config.residual,
            batch_norm=config.batch_norm, track_running_stats=config.track_running_stats, n_covariates=n_covariates,
            n_norm_domains=2 if config.domain_batch_norm and has_target else 1,
            depth_over_genes=config.depth_over_genes,
        )


def build_novelty_reference(model: CellTypeClassifier, data: TrainingData, device: torch.device,
                            seed: int) -> Optional[NoveltyReference]:
    """The bank of fit cells' embeddings and the model-selection cells' scores (train/novelty.py); None when
    no cell was held out for model selection (nothing to set thresholds on)."""
    if len(data.split.select) == 0 or len(data.split.fit) == 0:
        return None
    bank = bank_rows(data.codes, data.split.fit, seed)
    # the thresholds are quantiles: a few thousand model-selection cells set them as well as all of an atlas's
    rng = np.random.default_rng(seed)
    select = data.split.select
    select = np.sort(rng.choice(select, size=SELECTION_CELLS, replace=False)) if len(select) > SELECTION_CELLS \
        else select
    embed = partial(embed_rows, model, data.X, device=device, covariates=data.covariates)
    return NoveltyReference.build(embed(bank), embed(select), seed=seed)


def shift_reference(model: CellTypeClassifier, data: TrainingData, device: torch.device,
                    config: Config) -> ShiftReference:
    """The final model's embedding of a random sample of the run's calibration cells: every labeled cell when
    the run has folds (each is held out by one), else the model-selection cells."""
    calibrating = np.sort(np.concatenate([data.split.fit, data.split.select])) if config.n_folds else data.split.select
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(calibrating, size=min(SHIFT_REFERENCE_CELLS, len(calibrating)), replace=False))
    return ShiftReference(rows, embed_rows(model, data.X, rows, device, covariates=data.covariates))


def embedding_map(model: CellTypeClassifier, data: TrainingData, inputs: TrainingInputs, temperature: float,
                  device: torch.device, seed: int) -> pd.DataFrame:
    """The final model's embedding of a seeded sample of every cell (reference and target), on its first two
    principal components, with label, prediction, confidence and domain: the run report's map."""
    rng = np.random.default_rng(seed)
    n = data.X.shape[0]
    rows = np.sort(rng.choice(n, size=min(MAP_CELLS, n), replace=False))
    outputs = forward_rows(model, data.X, rows, device, covariates=data.covariates, with_embedding=True)
    probabilities = outputs.probabilities(temperature)
    domains = np.asarray(inputs.domain_names, dtype=object)[inputs.domains[rows]]
    return pd.DataFrame({"cell_id": inputs.cells.cell_ids[rows],
                         **dict(zip(("x", "y"), principal_components(cast(np.ndarray, outputs.embedding)).T)),
                         "label": inputs.labels[rows],
                         "predicted": np.asarray(inputs.encoding.classes, dtype=object)[probabilities.argmax(1)],
                         "confidence": probabilities.max(1), "domain": domains})


def _write_ids(path: Path, cell_ids: pd.Index, rows: np.ndarray) -> None:
    pd.DataFrame({"cell_id": cell_ids[rows]}).to_csv(path, index=False)


def prediction_table(cell_ids: pd.Index, rows: np.ndarray, split: str, truth: np.ndarray,
                     probabilities: np.ndarray, classes: tuple[str, ...]) -> pd.DataFrame:
    return predictions_table(
        cell_ids[rows], np.asarray(classes, dtype=object)[probabilities.argmax(1)] if len(rows) else [],
        probabilities.max(1) if len(rows) else [], probabilities, classes,
        known={"split": split, "true_label": truth})


def train_one_model(directory: Path, config: Config, inputs: TrainingInputs, data: TrainingData,
                    device: torch.device, fingerprint: dict) -> ModelResult:
    """Train one model on ``data.split`` and write its directory.

    Files: ``00_best_model_weights.safetensors``, ``model.json``, ``<name>_log.csv``,
    ``<name>_parameters.json``, ``train_idx.csv`` (fit), ``test_idx.csv`` (model selection),
    ``val_idx.csv`` (held out), ``predictions.csv``, ``labels.csv``, ``training_curve.png``.
    """
    name, final = directory.name, directory
    # written beside its final place and moved there whole: a model directory that exists is finished
    directory = final.parent / f"{INTERNAL_PREFIX}{name}.partial"
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    cell_ids = inputs.cells.cell_ids
    split = data.split
    for file_name, rows in (("train_idx.csv", split.fit), ("test_idx.csv", split.select),
                            ("val_idx.csv", split.held_out)):
        _write_ids(directory / file_name, cell_ids, rows)
    (directory / f"{name}_parameters.json").write_text(json.dumps(config.to_dict(), indent=1))

    model = build_model(config, data.X.shape[1], data.n_classes,
                        0 if data.covariates is None else data.covariates.shape[1], has_target=len(data.unlabeled) > 0)
    covariates = None
    if inputs.covariate_column:
        covariates = {"column": inputs.covariate_column, "categories": list(inputs.covariate_categories),
                      "scale": inputs.covariate_scale}
    checkpoint = CheckpointPolicy(final.parent / CHECKPOINT_DIR / f"{name}.pt", config.checkpoint_epochs,
                                  60.0 * config.checkpoint_minutes)
    trainer = Trainer(training_settings(config), device, log_path=directory / f"{name}_log.csv", name=name,
                      checkpoint=checkpoint)
    fit = trainer.fit(model, data)
    novelty = build_novelty_reference(model, data, device, config.seed)
    if novelty is not None:
        novelty.save(directory)

    # held-out cells for a fold; the model-selection cells for all_data (it has no held-out part)
    rows, kind = (split.held_out, "held_out") if len(split.held_out) else (split.select, "model_selection")
    outputs = forward_rows(model, data.X, rows, device, covariates=data.covariates)
    probabilities = outputs.probabilities(fit.temperature)
    truth_codes = data.codes[rows]
    classes = inputs.encoding.classes
    predictions = prediction_table(cell_ids, rows, kind, inputs.labels[rows], probabilities, classes)
    predictions.to_csv(directory / "predictions.csv", index=False)
    # the cells the weights were not fit on calibrate prediction sets (train/conformal.py); the final model
    # also keeps its embedding of a sample of the run's calibration cells, for sets weighted under shift
    calibration = ConformalCalibration.from_probabilities(probabilities, truth_codes, rows)
    if name == ALL_DATA_DIR:
        calibration.shift = shift_reference(model, data, device, config)
        embedding_map(model, data, inputs, fit.temperature, device, config.seed).to_csv(
            directory / EMBEDDING_MAP_FILE, index=False)
    calibration.save(directory)
    predictions[["cell_id", "true_label"]].rename(columns={"true_label": "label"}).to_csv(
        directory / "labels.csv", index=False)
    metrics: dict[str, float] = {}
    loss = float("nan")
    if len(rows):
        metrics = classification_metrics(truth_codes, probabilities.argmax(1))
        metrics["ece"] = expected_calibration_error(probabilities, truth_codes)
        metrics["ece_uncalibrated"] = expected_calibration_error(outputs.probabilities(), truth_codes)
        loss = float(F.cross_entropy(torch.from_numpy(outputs.logits / fit.temperature),
                                     torch.from_numpy(truth_codes)))

    plot_training_curve(fit.history, directory / "training_curve.png", f"{name}: training curve", fit.best_epoch)
    save_model(directory, model, genes=list(inputs.cells.genes), classes=classes, config=config.to_dict(),
               extra={"temperature": fit.temperature, "covariates": covariates, "training": {
                   "device": str(device), "held_out_loss": loss if len(split.held_out) else None,
                   "distributed": {"world_size": fit.world_size, "verified_steps": fit.verified_steps},
                   "name": name, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                   "stopped_early": fit.stopped_early, "seconds": round(fit.seconds, 2),
                   "semi_supervised": fit.semi_supervised, "n_fit": int(len(split.fit)),
                   "n_select": int(len(split.select)), "n_held_out": int(len(split.held_out)),
                   "n_target": int(len(data.unlabeled)), "domains": list(inputs.domain_names),
                   f"{kind}_metrics": metrics, "input_normalization": inputs.input_kind,
                   "target_gene_overlap": inputs.target_overlap.to_dict() if inputs.target_overlap else None,
                   "gene_selection": inputs.gene_report,
               }, "data_fingerprint": fingerprint,
               "novelty": None if novelty is None else {
                   "file": NOVELTY_FILE, "sha256": file_sha256(directory / NOVELTY_FILE), "k": novelty.k,
                   "n_bank": int(novelty.bank.shape[0]), "n_selection": int(len(novelty.selection_scores))},
               "conformal": {"file": CONFORMAL_FILE, "sha256": file_sha256(directory / CONFORMAL_FILE),
                             "cells": kind, "n_cells": int(len(rows))}})
    write_model_card(directory)
    directory.rename(final)
    remove_checkpoint(checkpoint)
    kill_point("model_done", name)
    return ModelResult(name, fit.best_epoch, fit.epochs_run, fit.seconds, metrics if kind == "held_out" else {},
                       loss, predictions)


def _check_enough_cells(config: Config, inputs: TrainingInputs) -> None:
    labeled = inputs.labeled_rows
    if config.n_folds and len(labeled) < 2 * config.n_folds:
        raise ScnymError(f"{len(labeled)} labeled cells are too few for {config.n_folds}-fold cross-validation; "
                         "lower --n_folds (0 skips cross-validation)")
    counts = np.bincount(inputs.codes[labeled])
    if config.n_folds and counts.max() < config.n_folds:
        raise ScnymError(f"every class has fewer than {config.n_folds} cells; lower --n_folds")


def train_tissue_independent(config: Config) -> dict:
    """Cross-validate and train the final model from the configured files; returns the run summary."""
    return run_training(config, lambda: load_training_inputs(config))


def run_training(config: Config, get_inputs: Callable[[], TrainingInputs],
                 command: str = "train_tissue_independent") -> dict:
    """Cross-validation folds plus all_data, written atomically to ``config.out_path``.

    ``get_inputs`` loads the data once the output directory is known to be writable.
    Returns the run summary (also in run_summary.json).
    """
    device = setup_runtime(config)
    only = selected_models(config)
    protected = PROTECTED_OUTPUTS if only is None else (*only, RUN_MARKER)
    with staged_directory(config.path("out_path"), overwrite=config.overwrite, protected=protected,
                          last=(RUN_MARKER,), writes=writes_outputs(),
                          owned=RUN_OUTPUTS if only is None else (), label="train" if only is None else "+".join(only),
                          resume=resuming(config)) as stage, stop_on_signals():
        return train_into(stage, config, get_inputs(), device, command, only)


# Keys that may differ between the jobs of one run (fold-level jobs of a SLURM array)
PER_JOB_KEYS = ("fold", "folds", "overwrite", "out_path", "device", "num_threads", "resume", "checkpoint_epochs",
                "checkpoint_minutes")
# the identity (job fingerprint) of the run being written into a directory, checked when it is continued
RUN_IDENTITY_FILE = INTERNAL_PREFIX + "run.json"


def job_fingerprint(config: Config, data_sha256: str) -> str:
    """Identifies a run across its fold-level jobs: same data and same settings."""
    settings = {k: v for k, v in config.to_dict().items() if k not in PER_JOB_KEYS}
    return hashlib.sha256(json.dumps([settings, data_sha256], sort_keys=True, default=str).encode()).hexdigest()


def model_names(config: Config) -> list[str]:
    return [f"fold{k:02d}" for k in range(config.n_folds)] + [ALL_DATA_DIR]


def selected_models(config: Config) -> Optional[list[str]]:
    """The models a fold-level job trains (--fold / --folds), or None for the whole run."""
    names = model_names(config)
    if config.fold is not None:
        if config.fold >= len(names):
            raise ScnymError(f"--fold {config.fold} is out of range: 0..{config.n_folds - 1} are the folds and "
                             f"{config.n_folds} is all_data")
        return [names[config.fold]]
    if config.folds is None:
        return None
    chosen = []
    for token in (t.strip() for t in config.folds.split(",") if t.strip()):
        if token == ALL_DATA_DIR:
            chosen.append(ALL_DATA_DIR)
        elif token.isdigit() and int(token) < len(names):
            chosen.append(names[int(token)])
        else:
            raise ScnymError(f"--folds {config.folds!r}: {token!r} is not a fold (0..{config.n_folds - 1}), "
                             f"{config.n_folds} or all_data")
    return sorted(set(chosen), key=names.index)


def train_into(directory: Path, config: Config, inputs: TrainingInputs, device: torch.device,
               command: str, only: Optional[list[str]] = None) -> dict:
    """Train the run's models into ``directory``; the whole run also gets its tables and run_summary.json.

    ``only`` restricts training to some models (a fold-level job); ``collect_folds`` then
    assembles the tables once every model is there.
    """
    started = time.perf_counter()
    _check_enough_cells(config, inputs)
    directory.mkdir(parents=True, exist_ok=True)
    cells, classes = inputs.cells, inputs.encoding.classes
    fingerprint = data_fingerprint(cells.X, cells.genes, cells.cell_ids, inputs.labels)
    fingerprint["job"] = job_fingerprint(config, fingerprint["sha256"])
    _claim(directory, fingerprint["job"])
    (directory / "scnym_config.json").write_text(json.dumps(config.to_dict(), indent=1))
    pd.DataFrame({"index": range(len(classes)), "label": classes}).to_csv(directory / "celltype_label.csv",
                                                                          index=False)
    labeled = inputs.labeled_rows
    splits: list[tuple[str, Split]] = []
    if config.n_folds:
        splits = [(f"fold{k:02d}", s) for k, s in enumerate(
            cross_validation_splits(labeled, inputs.codes, config.n_folds, config.val_fraction, config.seed))]
    splits.append((ALL_DATA_DIR, all_data_split(labeled, inputs.codes, config.val_fraction, config.seed)))
    for name, split in splits:
        if only is not None and name not in only:
            continue
        if model_complete(directory / name) is None:
            log.info("%s: finished before the run was interrupted; kept", name)
            continue
        data = TrainingData(cells.X, inputs.codes, split, len(classes), covariates=inputs.covariates,
                            unlabeled=inputs.unlabeled_rows, domains=inputs.domains)
        model_started = time.perf_counter()
        result = train_one_model(directory / name, config, inputs, data, device, fingerprint)
        position = [n for n, _ in splits].index(name) + 1
        log.info("%s (%d of %d models) trained in %.1f s", name, position, len(splits),
                 time.perf_counter() - model_started)
        if name != ALL_DATA_DIR:
            m = result.metrics
            log.info("%s held-out: accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f, ECE %.4f "
                     "(uncalibrated %.4f)", name, m["accuracy"], m["balanced_accuracy"], m["macro_f1"],
                     m["ece"], m["ece_uncalibrated"])
    kill_point("run_done")
    if only is not None:
        summary = {"command": command, "trained": only, "seconds": round(time.perf_counter() - started, 2)}
    else:
        summary = summarize_run(directory, command, time.perf_counter() - started)
    # the run's bookkeeping goes: it is complete
    shutil.rmtree(directory / CHECKPOINT_DIR, ignore_errors=True)
    (directory / RUN_IDENTITY_FILE).unlink(missing_ok=True)
    return summary


def _claim(directory: Path, job: str) -> None:
    """Mark ``directory`` as being written by the run ``job``; refuse to mix two runs' models in it (a resumed
    run must have the settings and data it was started with)."""
    identity = directory / RUN_IDENTITY_FILE
    if identity.is_file():
        earlier = json.loads(identity.read_text()).get("job")
        if earlier != job:
            raise ScnymError(f"the unfinished run in {directory} was started with other settings or other data; "
                             "continue it with those, or pass --overwrite true to delete it and start over")
        return
    identity.write_text(json.dumps({"job": job}))
