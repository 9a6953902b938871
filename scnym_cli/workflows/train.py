"""Cross-validated training: k stratified folds plus a final all_data model, written atomically.

Output layout (``out_path``)::

    celltype_label.csv, fold_eval_acc.csv, fold_eval_losses.csv, confusion_matrix.{csv,png},
    scnym_config.json, run_summary.json (written last: the run is complete)
    fold00/ ... foldNN/, all_data/   one model directory each (see :func:`train_one_model`)
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
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .._version import __version__
from ..config import Config
from ..data.splits import Split, all_data_split, cross_validation_splits
from ..errors import ScnymError
from ..nn import CellTypeClassifier
from ..report import evaluate_labeled, plot_training_curve, predictions_table, write_labeled_report
from ..staging import staged_directory
from ..store import ALL_DATA_DIR, MANIFEST_FILE, WEIGHTS_FILE, data_fingerprint, file_sha256, save_model
from ..train import Trainer, TrainingData
from ..train.conformal import (CONFORMAL_FILE, SHIFT_REFERENCE_CELLS, ConformalCalibration, ShiftReference,
                               coverage_summary, cross_conformal_sets, true_class_in_set)
from ..train.device import seeded_rng
from ..train.inference import embed_rows, forward_rows
from ..train.metrics import classification_metrics, expected_calibration_error
from ..train.novelty import NOVELTY_FILE, SELECTION_CELLS, NoveltyReference, bank_rows
from .inputs import TrainingInputs, load_training_inputs
from .runtime import setup_runtime, writes_outputs
from .settings import training_settings

log = logging.getLogger(__name__)

RUN_MARKER = "run_summary.json"
# the coverage of the prediction sets cross-validation reports (prediction chooses its own: --coverage)
REPORTED_COVERAGE = 0.9
PROTECTED_OUTPUTS = (RUN_MARKER, ALL_DATA_DIR, "fold_eval_acc.csv")
# every entry a whole training run writes (fold jobs write only their own folder)
RUN_OUTPUTS = ("fold[0-9][0-9]", ALL_DATA_DIR, "fold_eval_acc.csv", "fold_eval_losses.csv", "per_class_metrics.csv",
               "confusion_matrix.*", "reliability.csv", "reliability_diagram.png", RUN_MARKER, "celltype_label.csv",
               "scnym_config.json")


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
    return NoveltyReference.build(embed(bank), embed(select))


def shift_reference(model: CellTypeClassifier, data: TrainingData, device: torch.device,
                    config: Config) -> ShiftReference:
    """The final model's embedding of a random sample of the run's calibration cells: every labeled cell when
    the run has folds (each is held out by one), else the model-selection cells."""
    calibrating = np.sort(np.concatenate([data.split.fit, data.split.select])) if config.n_folds else data.split.select
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(calibrating, size=min(SHIFT_REFERENCE_CELLS, len(calibrating)), replace=False))
    return ShiftReference(rows, embed_rows(model, data.X, rows, device, covariates=data.covariates))


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
    name = directory.name
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
    trainer = Trainer(training_settings(config), device, log_path=directory / f"{name}_log.csv", name=name)
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
                          owned=RUN_OUTPUTS if only is None else ()) as stage:
        return train_into(stage, config, get_inputs(), device, command, only)


# Keys that may differ between the jobs of one run (fold-level jobs of a SLURM array)
PER_JOB_KEYS = ("fold", "folds", "overwrite", "out_path", "device", "num_threads")


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
        data = TrainingData(cells.X, inputs.codes, split, len(classes), covariates=inputs.covariates,
                            unlabeled=inputs.unlabeled_rows, domains=inputs.domains)
        result = train_one_model(directory / name, config, inputs, data, device, fingerprint)
        if name != ALL_DATA_DIR:
            m = result.metrics
            log.info("%s held-out: accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f, ECE %.4f "
                     "(uncalibrated %.4f)", name, m["accuracy"], m["balanced_accuracy"], m["macro_f1"],
                     m["ece"], m["ece_uncalibrated"])
    if only is not None:
        return {"command": command, "trained": only, "seconds": round(time.perf_counter() - started, 2)}
    return summarize_run(directory, command, time.perf_counter() - started)


def model_complete(directory: Path) -> Optional[str]:
    """None if ``directory`` holds a finished model, else what is missing."""
    if not directory.is_dir():
        return "missing"
    for name in (MANIFEST_FILE, WEIGHTS_FILE, "predictions.csv", f"{directory.name}_log.csv"):
        if not (directory / name).is_file():
            return f"incomplete (no {name})"
    return None


def summarize_run(directory: Path, command: str, seconds: float) -> dict:
    """fold_eval_acc.csv, fold_eval_losses.csv, confusion matrix and run_summary.json, from the model
    directories on disk (the same whether the folds ran in one job or in many)."""
    config = json.loads((directory / "scnym_config.json").read_text())
    manifests = {name: json.loads((directory / name / MANIFEST_FILE).read_text())
                 for name in [f"fold{k:02d}" for k in range(config["n_folds"])] + [ALL_DATA_DIR]}
    final = manifests[ALL_DATA_DIR]
    classes, training = final["classes"], final["training"]
    summary: dict = {
        "command": command, "package_version": __version__, "n_cells": final["data_fingerprint"]["n_cells"],
        "n_labeled": training["n_fit"] + training["n_select"], "n_target": training["n_target"],
        "n_genes": len(final["genes"]), "classes": classes, "device": training.get("device"),
        "n_folds": config["n_folds"],
    }
    if final.get("covariates"):
        summary["covariates"] = {k: final["covariates"][k] for k in ("column", "categories")}
    folds = [name for name in manifests if name != ALL_DATA_DIR]
    if folds:
        rows, losses, pooled = [], [], []
        for name in folds:
            t = manifests[name]["training"]
            rows.append({"fold": name, "n_cells": t["n_held_out"], **t["held_out_metrics"],
                         "best_epoch": t["best_epoch"], "epochs_run": t["epochs_run"]})
            losses.append({"fold": name, "loss": t["held_out_loss"]})
            pooled.append(pd.read_csv(directory / name / "predictions.csv"))
        fold_table = pd.DataFrame(rows)
        fold_table.to_csv(directory / "fold_eval_acc.csv", index=False)
        pd.DataFrame(losses).to_csv(directory / "fold_eval_losses.csv", index=False)
        pooled = pd.concat(pooled, keys=folds, names=["fold", None]).reset_index(level=0)
        truth = pooled["true_label"].astype(str)
        codes = pd.Index(classes).get_indexer(truth)
        probabilities = pooled[[f"prob_{c}" for c in classes]].to_numpy()
        # prediction sets of each fold's cells, calibrated on the other folds' cells: the coverage a query like
        # the reference gets (cross-conformal), over all cells and per class
        sets = {per_class: cross_conformal_sets(probabilities, codes, pooled["fold"].to_numpy(), REPORTED_COVERAGE,
                                                per_class) for per_class in (False, True)}
        evaluation = evaluate_labeled(truth, pooled["predicted_label"].astype(str), pooled["confidence"].to_numpy(),
                                      classes, true_class_in_set(sets[False], codes), sets[False].sum(axis=1))
        write_labeled_report(directory, evaluation, f"held-out predictions, {len(folds)} folds")
        metric_names = ["accuracy", "balanced_accuracy", "macro_f1", "ece"]
        summary["cross_validation"] = {
            name: {"mean": float(fold_table[name].mean()), "std": float(fold_table[name].std(ddof=0))}
            for name in metric_names}
        summary["conformal"] = {"coverage": REPORTED_COVERAGE, **{
            "per_class" if per_class else "over_all_cells": coverage_summary(sets[per_class], codes, len(classes))
            for per_class in (False, True)}}
        log.info("cross-validation (%d folds): accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f, ECE %.4f",
                 len(folds), *(summary["cross_validation"][n]["mean"] for n in metric_names))
        marginal, per_class = summary["conformal"]["over_all_cells"], summary["conformal"]["per_class"]
        log.info("cross-validation prediction sets at coverage %g: %.1f%% hold the true class (%.2f classes on "
                 "average; lowest class %.1f%%), per-class sets %.1f%% (%.2f classes; lowest class %.1f%%)",
                 REPORTED_COVERAGE, 100 * marginal["coverage"], marginal["mean_set_size"],
                 100 * marginal["lowest_class_coverage"], 100 * per_class["coverage"], per_class["mean_set_size"],
                 100 * per_class["lowest_class_coverage"])
    summary["seconds"] = round(seconds, 2)
    (directory / RUN_MARKER).write_text(json.dumps(summary, indent=1))
    return summary


def collect_folds(config: Config) -> dict:
    """Assemble a run whose models were trained by separate fold-level jobs; say what is missing."""
    directory = config.path("out_path")
    if not (directory / "scnym_config.json").is_file():
        raise ScnymError(f"{directory} holds no scnym_config.json: no fold-level job has finished there")
    stored = json.loads((directory / "scnym_config.json").read_text())
    names = [f"fold{k:02d}" for k in range(stored["n_folds"])] + [ALL_DATA_DIR]
    problems = {name: problem for name in names if (problem := model_complete(directory / name))}
    if problems:
        listed = "; ".join(f"{name} {problem}" for name, problem in problems.items())
        raise ScnymError(f"{directory}: {len(names) - len(problems)} of {len(names)} models are complete; {listed} "
                         "(rerun those jobs with --fold N, all_data is N = n_folds)")
    jobs = {json.loads((directory / n / MANIFEST_FILE).read_text())["data_fingerprint"].get("job") for n in names}
    if len(jobs) != 1:
        raise ScnymError(f"the models in {directory} come from jobs with different data or settings; rerun them "
                         "with one config")
    with staged_directory(directory, overwrite=True, protected=(), last=(RUN_MARKER,),
                          writes=writes_outputs()) as stage:
        for name in ("scnym_config.json", "celltype_label.csv"):
            shutil.copy(directory / name, stage / name)
        for name in names:  # summarize from a view of the finished models (symlinks: nothing copied)
            (stage / name).symlink_to((directory / name).resolve(), target_is_directory=True)
        summary = summarize_run(stage, stored.get("command", "train_tissue_independent"), 0.0)
        for name in names:
            (stage / name).unlink()
    log.info("collected %d models in %s", len(names), directory)
    return summary
