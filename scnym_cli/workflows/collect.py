"""A training run's tables, from the model directories on disk: written at the end of a run, or by
``collect_folds`` once the fold-level jobs of a run (a SLURM array) have all finished.

Tables: fold_eval_acc.csv, fold_eval_losses.csv, per_class_metrics.csv, confusion_matrix.{csv,png},
reliability.csv / reliability_diagram.png, run_summary.json (written last: the run is complete).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd

from .._version import __version__
from ..card import write_run_cards
from ..html_report import write_run_report
from ..config import Config
from ..errors import ScnymError
from ..report import evaluate_labeled, write_labeled_report
from ..staging import staged_directory
from ..store import ALL_DATA_DIR, MANIFEST_FILE, WEIGHTS_FILE
from ..train.conformal import coverage_summary, held_out_fold_sets, true_class_in_set
from .runtime import writes_outputs

log = logging.getLogger(__name__)

RUN_MARKER = "run_summary.json"
# the coverage of the prediction sets cross-validation reports (prediction chooses its own: --coverage)
REPORTED_COVERAGE = 0.9


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
        # prediction sets of each fold's cells, calibrated on the other folds' cells: cross-validation's measure
        # of pooled split conformal (the default's cross-conformal sets need cells no model was fit on:
        # bench/conformal_holdout.py), over all cells and per class
        sets = {per_class: held_out_fold_sets(probabilities, codes, pooled["fold"].to_numpy(), REPORTED_COVERAGE,
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
    write_run_cards(directory, summary)
    write_run_report(directory, summary)
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
                          writes=writes_outputs(), label="collect") as stage:
        for name in ("scnym_config.json", "celltype_label.csv"):
            shutil.copy(directory / name, stage / name)
        for name in names:  # summarize from a view of the finished models (symlinks: nothing copied)
            (stage / name).symlink_to((directory / name).resolve(), target_is_directory=True)
        summary = summarize_run(stage, stored.get("command", "train_tissue_independent"), 0.0)
        for name in names:
            (stage / name).unlink()
    log.info("collected %d models in %s", len(names), directory)
    return summary
