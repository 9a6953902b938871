"""Tissue-aware training: the upper group (e.g. tissue) as a model input, or one model per group.

- ``train_tissue_dependent``: the upper group is one-hot encoded and appended to the input, after
  input dropout; its categories are stored in the manifest, and prediction needs the query's column.
- ``train_tissue_specific``: a complete cross-validated run per group under ``tissues/<group>/``,
  a summary table across groups, and ``tissue_specific.json`` that routes each query cell to its
  group's model at prediction time.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from typing import Optional

import numpy as np
import pandas as pd

from .._version import __version__
from ..config import Config
from ..data import UNLABELED, LabelEncoding
from ..data.labels import one_hot, read_groups
from ..errors import ScnymError
from ..staging import staged_directory
from ..store import ROUTING_FILE
from .inputs import TrainingInputs, load_training_inputs
from ..train.checkpoint import stop_on_signals
from .runtime import resuming, setup_runtime, writes_outputs
from .train import PROTECTED_OUTPUTS, RUN_MARKER, run_training, train_into

log = logging.getLogger(__name__)

TISSUES_DIR = "tissues"


def typical_expression(X) -> float:
    """Median non-zero ln(CPM+1) value: the one-hot is put on the scale of the expression inputs, so
    that optimizers with per-weight step sizes (adadelta) move tissue weights as fast as gene weights."""
    from ..data.matrix import row_blocks

    values = next(row_blocks(X)).data[: 1_000_000]
    return float(np.median(values)) if values.size else 1.0


def with_group_covariates(inputs: TrainingInputs, column: str) -> TrainingInputs:
    groups = read_groups(inputs.cells.obs, column, inputs.cells.source)
    categories = tuple(sorted(set(groups)))
    if len(categories) < 2:
        log.warning("--upper_group %r has a single value (%s): the tissue one-hot carries no information",
                    column, categories[0])
    scale = round(typical_expression(inputs.cells.X), 4)
    log.info("tissue-dependent model: %d %r categories appended to the input (one-hot value %.3g): %s",
             len(categories), column, scale, ", ".join(categories))
    return replace(inputs, covariates=one_hot(groups, categories, scale), covariate_column=column,
                   covariate_categories=categories, covariate_scale=scale)


def train_tissue_dependent(config: Config) -> dict:
    """One model conditioned on the upper group; same cross-validation and layout as tissue-independent."""
    return run_training(config, lambda: with_group_covariates(load_training_inputs(config), config.upper_group),
                        command="train_tissue_dependent")


# ---------------------------------------------------------------------- tissue-specific
def _safe_name(group: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", group).strip("._") or "group"
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def subset_inputs(inputs: TrainingInputs, rows: np.ndarray) -> TrainingInputs:
    """The cells of ``rows``, labels re-encoded to the classes present among them."""
    cells = inputs.cells.subset_cells(rows)
    labels = inputs.labels[rows]
    encoding = LabelEncoding.fit(labels, "labels")
    names, domains = np.unique(np.asarray(inputs.domain_names)[inputs.domains[rows]], return_inverse=True)
    return TrainingInputs(cells, labels, encoding, encoding.encode(labels), inputs.input_kind,
                          domains.astype(np.int64), tuple(names), inputs.target_overlap)


def _skip_reason(config: Config, labels: np.ndarray) -> Optional[str]:
    labeled = labels[labels != UNLABELED]
    classes, counts = np.unique(labeled, return_counts=True)
    needed = max(2 * config.n_folds, 10)
    if len(classes) < 2:
        return f"a single class ({classes[0] if len(classes) else 'none'}): nothing to classify"
    if len(labeled) < needed:
        return f"{len(labeled)} labeled cells, fewer than {needed}"
    if config.n_folds and counts.max() < config.n_folds:
        return f"no class has {config.n_folds} cells for {config.n_folds}-fold cross-validation"
    return None


def train_tissue_specific(config: Config) -> dict:
    """A full cross-validated model per upper group; groups too small or with one class are skipped."""
    started = time.perf_counter()
    device = setup_runtime(config)
    protected = (*PROTECTED_OUTPUTS, ROUTING_FILE, TISSUES_DIR)
    with staged_directory(config.path("out_path"), overwrite=config.overwrite, protected=protected,
                          last=(RUN_MARKER,), writes=writes_outputs(), label="tissues",
                          resume=resuming(config)) as stage, stop_on_signals():
        inputs = load_training_inputs(config)
        groups = read_groups(inputs.cells.obs, config.upper_group, inputs.cells.source)
        rows_by_group = {g: np.flatnonzero(groups == g) for g in sorted(set(groups))}
        taken: set[str] = set()
        routes, rows = {}, []
        for group, group_rows in rows_by_group.items():
            reason = _skip_reason(config, inputs.labels[group_rows])
            entry = {"group": group, "n_cells": int(len(group_rows)),
                     "n_labeled": int((inputs.labels[group_rows] != UNLABELED).sum())}
            if reason:
                log.warning("%s %r skipped: %s", config.upper_group, group, reason)
                rows.append({**entry, "status": "skipped", "reason": reason})
                continue
            directory = f"{TISSUES_DIR}/{_safe_name(group, taken)}"
            log.info("== %s %r: %d cells -> %s", config.upper_group, group, len(group_rows), directory)
            summary = train_into(stage / directory, config, subset_inputs(inputs, group_rows), device,
                                 "train_tissue_specific")
            routes[group] = directory
            cv = summary.get("cross_validation", {})
            rows.append({**entry, "status": "trained", "reason": "", "n_classes": len(summary["classes"]),
                         **{f"cv_{m}": cv.get(m, {}).get("mean", np.nan) for m in
                            ("accuracy", "balanced_accuracy", "macro_f1", "ece")}, "directory": directory})
        if not routes:
            raise ScnymError(f"no {config.upper_group!r} group could be trained: "
                             + "; ".join(f"{r['group']}: {r['reason']}" for r in rows))
        table = pd.DataFrame(rows)
        table.to_csv(stage / "tissues_summary.csv", index=False)
        (stage / "scnym_config.json").write_text(json.dumps(config.to_dict(), indent=1))
        (stage / ROUTING_FILE).write_text(json.dumps(
            {"column": config.upper_group, "models": routes,
             "skipped": {r["group"]: r["reason"] for r in rows if r["status"] == "skipped"}}, indent=1))
        summary = {"command": "train_tissue_specific", "package_version": __version__,
                   "upper_group": config.upper_group, "groups_trained": list(routes),
                   "groups_skipped": [r["group"] for r in rows if r["status"] == "skipped"],
                   "seconds": round(time.perf_counter() - started, 2)}
        (stage / RUN_MARKER).write_text(json.dumps(summary, indent=1))
    return summary
