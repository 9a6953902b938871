"""find_cell_type_markers: ranked marker genes per class from a trained model.

Outputs (``out_path``):
  input_optimization_optima.csv     classes x genes: optimized input, mean over restarts
  input_optimization_markers.csv    class, rank, gene, score (specificity of the optimum), optimum
  expected_gradients_saliency.csv   genes x classes: mean attribution over the class's cells
  expected_gradients_markers.csv    class, rank, gene, saliency, kind, n_cells, source: genes the class
                                    expresses more than the reference cells first (kind 'expressed'),
                                    then genes whose absence is the evidence ('absent')
  cell_attributions/<class>.h5ad    per-cell attributions (with --write_cell_attributions)
  marker_heatmap.png                top markers per class: mean expression per class (or optima)
  markers_summary.json
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from ..config import Config
from ..data import CellMatrix, align_genes
from ..data.labels import require_column
from ..errors import ScnymError
from ..interpret import expected_gradients, optimize_class_inputs, rank_optima
from ..report import plot_marker_heatmap
from ..staging import staged_directory
from ..store import LoadedModel, covariates_for, load_model, routing_of
from .inputs import load_cells
from .runtime import setup_runtime, writes_outputs

log = logging.getLogger(__name__)

PROTECTED_OUTPUTS = ("markers_summary.json", "expected_gradients_markers.csv", "input_optimization_markers.csv")


def chosen_classes(loaded: LoadedModel, requested: Optional[str]) -> list[str]:
    """The classes to explain; a class the model does not know is an error that lists those it knows."""
    if not requested:
        return list(loaded.classes)
    names = [c.strip() for c in requested.split(",") if c.strip()]
    unknown = [c for c in names if c not in loaded.classes]
    if unknown:
        raise ScnymError(f"the model does not know class {unknown[0]!r}; its classes are: "
                         f"{', '.join(loaded.classes)}")
    return names


def ranked(scores: np.ndarray, genes: list[str], classes: list[str], n_top: Optional[int] = None,
           value_name: str = "score") -> pd.DataFrame:
    """Long table class, rank, gene, score: genes sorted by decreasing score within each class."""
    tables = []
    for row, name in zip(scores, classes):
        order = np.argsort(-row, kind="stable")[: n_top or len(genes)]
        tables.append(pd.DataFrame({"class": name, "rank": np.arange(1, len(order) + 1),
                                    "gene": np.asarray(genes)[order], value_name: row[order]}))
    return pd.concat(tables, ignore_index=True)


@dataclass
class GradientResult:
    saliency: pd.Series            # genes, mean attribution over the class's cells, sorted decreasing
    attributions: pd.DataFrame     # cells x genes
    higher_in_class: pd.Series     # genes: mean expression in the class above the reference cells'?


def explain_class(loaded: LoadedModel, cells: CellMatrix, labels: np.ndarray, target: str, source: str,
                  config: Config, device, covariates: Optional[np.ndarray] = None) -> GradientResult:
    """Expected gradients of ``target`` for its cells in ``cells`` (already aligned to the model)."""
    class_index = loaded.classes.index(target)
    target_rows = np.flatnonzero(labels == target)
    if len(target_rows) == 0:
        raise ScnymError(f"no cell is labelled {target!r} in the data; expected gradients need the class's cells")
    if source == "all":
        reference_rows = np.flatnonzero(labels != target)
    else:
        reference_rows = np.flatnonzero(labels == source)
        if len(reference_rows) == 0:
            present = ", ".join(sorted(set(labels))[:10])
            raise ScnymError(f"no cell is labelled {source!r} (the reference class, --marker_source); labels present: "
                             f"{present}")
    if len(reference_rows) == 0:
        raise ScnymError(f"every cell is {target!r}: expected gradients need other cells as a reference")
    if config.eg_max_cells and len(target_rows) > config.eg_max_cells:
        target_rows = np.sort(np.random.default_rng(config.seed).choice(target_rows, config.eg_max_cells,
                                                                         replace=False))
    attributions = expected_gradients(loaded.model, cells.X, target_rows, reference_rows, class_index,
                                      n_samples=config.eg_samples, seed=config.seed, device=device,
                                      covariates=covariates)
    frame = pd.DataFrame(attributions, index=cells.cell_ids[target_rows], columns=cells.genes)
    # a gene can be evidence by its absence too (attribution > 0 with lower expression): say which
    difference = (np.asarray(cells.X[target_rows].mean(axis=0)).ravel()
                  - np.asarray(cells.X[reference_rows].mean(axis=0)).ravel())
    return GradientResult(frame.mean(axis=0).sort_values(ascending=False), frame,
                          pd.Series(difference > 0, index=cells.genes))


def marker_table(result: GradientResult, name: str) -> pd.DataFrame:
    """Genes the class expresses more than its reference, by decreasing saliency ('expressed'), then
    genes whose absence is the evidence ('absent'), likewise."""
    table = pd.DataFrame({"gene": result.saliency.index, "saliency": result.saliency.to_numpy(),
                          "higher_in_class": result.higher_in_class.reindex(result.saliency.index).to_numpy()})
    table = table.sort_values(["higher_in_class", "saliency"], ascending=[False, False], kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.insert(0, "class", name)
    table["kind"] = np.where(table["higher_in_class"], "expressed", "absent")
    return table.drop(columns="higher_in_class").reset_index(drop=True)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def find_cell_type_markers(config: Config) -> dict:
    device = setup_runtime(config)
    if routing_of(config.path("model_path")):
        raise ScnymError(f"{config.model_path} holds one model per tissue; give one of them as --model_path "
                         "(e.g. <run>/tissues/<group>)")
    loaded = load_model(config.path("model_path"), device)
    classes = chosen_classes(loaded, config.marker_classes)
    methods = {"both": ("input_optimization", "expected_gradients")}.get(config.marker_methods,
                                                                         (config.marker_methods,))
    if "expected_gradients" in methods and config.input_counts is None:
        raise ScnymError("expected gradients need labeled cells: give --input_counts (with --lower_group), or "
                         "--marker_methods input_optimization")
    genes = list(loaded.genes)
    summary: dict = {"model": str(loaded.directory), "classes": classes, "methods": list(methods)}
    with staged_directory(config.path("out_path"), overwrite=config.overwrite, protected=PROTECTED_OUTPUTS,
                          last=("markers_summary.json",), writes=writes_outputs(), label="markers") as stage:
        cells = labels = covariates = None
        if config.input_counts is not None:
            cells, _ = load_cells(config, config.input_counts, metadata=config.training_metadata,
                                  translate_to=genes)
            covariates = covariates_for(loaded.manifest, cells.obs, cells.source)
            cells, overlap = align_genes(cells, genes, min_overlap=config.min_gene_overlap, what="marker data")
            labels = require_column(cells.obs, config.lower_group, "--lower_group", cells.source).astype(str).to_numpy()
            summary["gene_overlap"] = overlap.to_dict()
        heat_source: Optional[str] = None
        heat_scores: Optional[np.ndarray] = None
        if "input_optimization" in methods:
            fixed = None
            if loaded.manifest.get("covariates"):
                fixed = np.zeros(loaded.model.n_covariates, dtype=np.float32)  # no tissue: expression alone
            optima = optimize_class_inputs(loaded.model, list(range(len(loaded.classes))),
                                           n_restarts=config.n_restarts, n_steps=config.optimization_steps,
                                           l1=config.l1_reg, seed=config.seed, device=device, covariates=fixed)
            mean = optima.mean(axis=1)
            pd.DataFrame(mean, index=pd.Index(loaded.classes, name="class"), columns=genes).to_csv(
                stage / "input_optimization_optima.csv")
            specificity = rank_optima(optima)
            keep = [loaded.classes.index(c) for c in classes]
            table = ranked(specificity[keep], genes, classes)
            table["optimum"] = [mean[loaded.classes.index(c), genes.index(g)] for c, g in
                                zip(table["class"], table["gene"])]
            table.to_csv(stage / "input_optimization_markers.csv", index=False)
            heat_source, heat_scores = "input_optimization", specificity[keep]
            log.info("input optimization: %d classes x %d restarts, %d steps", len(loaded.classes),
                     config.n_restarts, config.optimization_steps)
        if "expected_gradients" in methods and cells is not None and labels is not None:
            saliency, tables = {}, []
            for name in classes:
                if not np.any(labels == name):
                    log.warning("no cell labelled %r in %s: skipped for expected gradients", name, cells.source)
                    continue
                result = explain_class(loaded, cells, labels, name, config.marker_source, config, device,
                                       covariates)
                saliency[name] = result.saliency.reindex(genes)
                part = marker_table(result, name)
                part["n_cells"], part["source"] = len(result.attributions), config.marker_source
                tables.append(part)
                if config.write_cell_attributions:
                    import anndata

                    (stage / "cell_attributions").mkdir(exist_ok=True)
                    anndata.AnnData(X=result.attributions.to_numpy(),
                                    obs=pd.DataFrame(index=result.attributions.index.astype(str)),
                                    var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(
                        stage / "cell_attributions" / f"{_file_name(name)}.h5ad")
                log.info("expected gradients %r: top genes %s", name, ", ".join(result.saliency.index[:8]))
            if not tables:
                raise ScnymError(f"none of the classes {', '.join(classes)} has cells labelled in column "
                                 f"{config.lower_group!r} of {cells.source}")
            pd.DataFrame(saliency).rename_axis("gene").to_csv(stage / "expected_gradients_saliency.csv")
            pd.concat(tables, ignore_index=True).to_csv(stage / "expected_gradients_markers.csv", index=False)
            heat_source = "expected_gradients"
            markers = pd.concat(tables, ignore_index=True)
            # the heat map shows each class's top expressed markers
            heat_scores = np.vstack([
                -pd.Index(genes).map(dict(zip(markers.loc[markers["class"] == c, "gene"],
                                              markers.loc[markers["class"] == c, "rank"]))).to_numpy(dtype=float)
                if c in saliency else np.full(len(genes), -np.inf) for c in classes])
        if heat_source is None or heat_scores is None:
            raise ScnymError(f"--marker_methods {config.marker_methods}: no marker method ran")
        summary["top_markers"] = {
            c: list(np.asarray(genes)[np.argsort(-heat_scores[i])[: config.n_top_markers]])
            for i, c in enumerate(classes) if np.isfinite(heat_scores[i]).any()}
        summary["top_markers_method"] = heat_source
        plot_marker_heatmap(summary["top_markers"], genes, cells, labels, stage / "marker_heatmap.png",
                            title=f"top {config.n_top_markers} markers per class ({heat_source.replace('_', ' ')})",
                            n_top=min(config.n_top_markers, 10))
        (stage / "markers_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
