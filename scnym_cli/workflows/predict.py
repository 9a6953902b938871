"""Predict cell types of new data with a trained model.

The model (architecture, genes, classes, temperature) comes from its manifest. The query is
normalized over its own genes, aligned to the model's genes (overlap reported, too little
overlap is an error), and predicted chunk by chunk.

Outputs (``out_path``): ``predictions.csv`` (cell_id, predicted_label, confidence, prob_<class>),
``gene_overlap.json``, ``prediction_summary.json``, optionally ``logits.csv`` and
``embedding.csv``, and for h5ad input ``annotated.h5ad``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..config import Config
from ..data import UNKNOWN, CellMatrix, GeneOverlap, align_genes, read_gene_list
from ..data.labels import require_column
from ..errors import ScnymError
from ..staging import staged_directory
from ..store import LoadedModel, load_model
from ..train.inference import forward_rows
from ..train.metrics import classification_metrics
from .inputs import load_cells, setup_runtime
from .tissues import covariates_for, read_groups, routing_of

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
PROTECTED_OUTPUTS = (PREDICTIONS_FILE, "prediction_summary.json", "annotated.h5ad")


def _check_training_gene_names(config: Config, loaded: LoadedModel) -> None:
    if config.training_gene_names is None:
        return
    given = read_gene_list(config.training_gene_names, "--training_gene_names")
    if given != list(loaded.genes):
        raise ScnymError(
            f"--training_gene_names ({len(given)} genes) differs from the genes the model was trained on "
            f"({len(loaded.genes)}, in {loaded.directory}/model.json); omit it: the model's own list is used")


def annotate(adata, *, key: str, labels: np.ndarray, confidence: np.ndarray, probabilities: np.ndarray,
             embedding: np.ndarray, classes: list[str]) -> None:
    """Write predictions into an AnnData (in place), scanpy style."""
    adata.obs[key] = pd.Categorical(labels)
    adata.obs[f"{key}_confidence"] = confidence
    adata.obsm[f"{key}_probabilities"] = probabilities.astype(np.float32)
    adata.obsm["X_scnym"] = embedding.astype(np.float32)
    adata.uns[f"{key}_classes"] = list(classes)


@dataclass
class Predictions:
    """Per-cell results of one model on one dataset (rows in the data's cell order)."""

    cell_ids: pd.Index
    labels: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    embedding: Optional[np.ndarray]
    classes: list[str]
    overlap: GeneOverlap

    def table(self) -> pd.DataFrame:
        """cell_id, predicted_label, confidence, prob_<class>..."""
        table = pd.DataFrame({"cell_id": self.cell_ids, "predicted_label": self.labels,
                              "confidence": self.confidence})
        return pd.concat([table, pd.DataFrame(self.probabilities, columns=[f"prob_{c}" for c in self.classes])],
                         axis=1)


def predict_cells(loaded: LoadedModel, cells: CellMatrix, config: Config, device, *,
                  with_embedding: bool = False) -> Predictions:
    """Align ``cells`` (already ln(CPM+1)) to the model's genes and predict them chunk by chunk."""
    covariates = covariates_for(loaded.manifest, cells)
    cells, overlap = align_genes(cells, loaded.genes, min_overlap=config.min_gene_overlap, what="query")
    outputs = forward_rows(loaded.model, cells.X, None, device, chunk_size=config.prediction_chunk_size,
                           covariates=covariates, with_embedding=with_embedding)
    probabilities = outputs.probabilities(loaded.temperature)
    classes = list(loaded.classes)
    confidence = probabilities.max(axis=1)
    labels = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]
    if config.unknown_threshold > 0:
        labels = np.where(confidence < config.unknown_threshold, UNKNOWN, labels)
    return Predictions(cells.cell_ids, labels, confidence, probabilities, outputs.logits, outputs.embedding,
                       classes, overlap)


def predict_routed(routing: dict, model_path: Path, cells: CellMatrix, config: Config, device, *,
                   with_embedding: bool = False) -> Predictions:
    """Tissue-specific models: each cell is predicted by its group's model; classes are the union
    (a class a group's model does not know has probability 0 for that group's cells)."""
    column, models = routing["column"], routing["models"]
    groups = read_groups(cells.obs, column, cells.source)
    unseen = ~pd.Index(groups).isin(list(models))
    if unseen.any():
        names = ", ".join(sorted(set(groups[unseen]))[:5])
        raise ScnymError(f"{int(unseen.sum())} query cells belong to {column!r} groups without a model ({names}); "
                         f"models exist for {', '.join(models)}: remove those cells or predict them with a "
                         "tissue-independent model")
    loaded = {g: load_model(Path(model_path) / d, device) for g, d in models.items() if (groups == g).any()}
    classes = sorted(set().union(*(m.classes for m in loaded.values())))
    n = cells.n_cells
    probabilities = np.zeros((n, len(classes)), dtype=np.float32)
    logits = np.full((n, len(classes)), np.nan, dtype=np.float32)
    labels, confidence = np.empty(n, dtype=object), np.zeros(n, dtype=np.float32)
    embedding = None
    overlap = None
    for group, model in loaded.items():
        rows = np.flatnonzero(groups == group)
        part = predict_cells(model, cells.subset_cells(rows), config, device, with_embedding=with_embedding)
        columns = pd.Index(classes).get_indexer(part.classes)
        probabilities[np.ix_(rows, columns)] = part.probabilities
        logits[np.ix_(rows, columns)] = part.logits
        labels[rows], confidence[rows] = part.labels, part.confidence
        if with_embedding:
            embedding = np.zeros((n, part.embedding.shape[1]), np.float32) if embedding is None else embedding
            embedding[rows] = part.embedding
        overlap = overlap or part.overlap
        log.info("%s %r: %d cells predicted by %s", column, group, len(rows), models[group])
    return Predictions(cells.cell_ids, labels, confidence, probabilities, logits, embedding, classes, overlap)


def predict_cell_types(config: Config) -> dict:
    """Run prediction as configured; returns the summary (also in prediction_summary.json)."""
    device = setup_runtime(config)
    routing = routing_of(config.model_path)
    loaded = None if routing else load_model(config.model_path, device)
    if loaded is not None:
        _check_training_gene_names(config, loaded)
    with staged_directory(config.out_path, overwrite=config.overwrite, protected=PROTECTED_OUTPUTS,
                          last=(PREDICTIONS_FILE,)) as stage:
        is_h5ad = str(config.input_counts).lower().endswith(".h5ad")
        adata = None
        if is_h5ad and config.write_h5ad:
            import anndata

            try:
                adata = anndata.read_h5ad(config.input_counts)
            except Exception as e:
                raise ScnymError(f"could not read {config.input_counts} as h5ad ({type(e).__name__}: {e})") from None
        cells, kind = load_cells(config, config.input_counts, metadata=config.training_metadata, adata=adata,
                                 translate_genes=True)
        with_embedding = config.write_embedding or adata is not None
        if routing:
            result = predict_routed(routing, config.model_path, cells, config, device, with_embedding=with_embedding)
        else:
            result = predict_cells(loaded, cells, config, device, with_embedding=with_embedding)
        overlap, labels, confidence, classes = result.overlap, result.labels, result.confidence, result.classes
        (stage / "gene_overlap.json").write_text(json.dumps(overlap.to_dict(), indent=1))
        table = result.table()
        if config.write_logits:
            pd.concat([table[["cell_id"]], pd.DataFrame(result.logits, columns=[f"logit_{c}" for c in classes])],
                      axis=1).to_csv(stage / "logits.csv", index=False)
        if config.write_embedding:
            embedding = pd.DataFrame(result.embedding,
                                     columns=[f"scnym_{i}" for i in range(result.embedding.shape[1])])
            pd.concat([table[["cell_id"]], embedding], axis=1).to_csv(stage / "embedding.csv", index=False)

        counts = pd.Series(labels).value_counts()
        summary: dict = {
            "model": str(loaded.directory if loaded else config.model_path), "input": str(config.input_counts),
            "n_cells": int(cells.n_cells), "input_normalization": kind, "gene_overlap": overlap.to_dict(),
            "temperature": loaded.temperature if loaded else "per tissue model",
            "unknown_threshold": config.unknown_threshold,
            "predicted_counts": {str(k): int(v) for k, v in counts.items()},
            "mean_confidence": float(confidence.mean()) if len(confidence) else float("nan"),
        }
        if config.lower_group in cells.obs.columns:
            truth = require_column(cells.obs, config.lower_group, "--lower_group", cells.source).astype(str)
            known = truth.isin(classes).to_numpy()
            if not known.all():
                log.info("%d query cells have labels the model does not know (%s); they count as errors",
                         int((~known).sum()), ", ".join(sorted(set(truth[~known]))[:5]))
            summary["metrics_vs_" + config.lower_group] = classification_metrics(truth.to_numpy(), labels)
            m = summary["metrics_vs_" + config.lower_group]
            log.info("vs query column %r: accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f",
                     config.lower_group, m["accuracy"], m["balanced_accuracy"], m["macro_f1"])
        (stage / "prediction_summary.json").write_text(json.dumps(summary, indent=1))

        if adata is not None:
            annotate(adata, key=config.prediction_key, labels=labels, confidence=confidence,
                     probabilities=result.probabilities, embedding=result.embedding, classes=classes)
            adata.write_h5ad(stage / "annotated.h5ad")
        table.to_csv(stage / PREDICTIONS_FILE, index=False)
        log.info("predicted %d cells: %s", cells.n_cells, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return summary
