"""Predict cell types of new data with a trained model, chunk by chunk.

The model (architecture, genes, classes, temperature, covariates) comes from its manifest; a training
run predicts with its fold models and all_data together (``--ensemble``, workflows/ensemble.py); a
tissue-specific run routes each cell to its group's models. The query is read in blocks of
``prediction_chunk_size`` cells (an h5ad file is streamed from disk), each block is normalized over
the query's own genes, aligned to the model's genes and predicted; outputs are written as blocks
arrive, so memory does not grow with the number of cells.

Outputs (``out_path``): ``predictions.csv`` (cell_id, predicted_label, confidence, [novelty,
disagreement, prediction_set, set_size,] prob_<class>), ``gene_overlap.json``,
``prediction_summary.json``, optionally ``logits.csv`` and ``embedding.csv``, and for h5ad input
``annotated.h5ad``; for a labeled query, per-class metrics, a confusion matrix and a reliability
diagram.
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..config import Config
from ..html_report import REPORT_FILE, write_prediction_report
from ..data import UNKNOWN, read_gene_list
from ..data.labels import per_cell_strings
from ..data.readers import is_zarr_store
from ..data.stream import (CellChunks, H5adChunks, ShardedH5adChunks, blockwise_obs_layout, open_anndata_store,
                           read_obs)
from ..errors import ScnymError
from ..report import (EMBEDDING_MAP_FILE, MAP_CELLS, LabeledTally, predictions_table, principal_components,
                      write_labeled_report)
from ..staging import staged_directory
from ..train.conformal import true_class_in_set
from .annotation import uns_safe
from .inputs import open_query, query_genes
from .predictor import ChunkResult, Predictor, iterate_predictions
from .runtime import setup_runtime, writes_outputs

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
PROTECTED_OUTPUTS = (PREDICTIONS_FILE, "prediction_summary.json", "annotated.h5ad", "annotated.zarr", REPORT_FILE)
# every entry a prediction writes
PREDICTION_OUTPUTS = (*PROTECTED_OUTPUTS, "logits.csv", "embedding.csv", "gene_overlap.json", "per_class_metrics.csv",
                      EMBEDDING_MAP_FILE,
                      "confusion_matrix.*", "reliability.csv", "reliability_diagram.png")


class CsvBlocks:
    """A CSV written block by block (header once) with pyarrow's writer: formatting a million rows of
    probabilities took pandas 6 s of a 31 s prediction, pyarrow a seventh of that. Each block is converted and
    written on a background thread while the next one is predicted (pyarrow releases the GIL); one block at a
    time waits there, and an error of the writer is raised at the next write or at close."""

    def __init__(self, path: Path):
        self.path = path
        self.writer: Any = None   # a pyarrow CSVWriter, opened with the first block's schema
        self.schema: Any = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scnym-csv")
        self._last: Optional[Future] = None

    def write(self, frame: pd.DataFrame) -> None:
        self._wait()
        self._last = self._thread.submit(self._write, frame)

    def _wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def _write(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.csv as pa_csv

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pa_csv.CSVWriter(str(self.path), self.schema,
                                           write_options=pa_csv.WriteOptions(quoting_style="needed"))
        # a later block may infer other types (e.g. a label column of Unknown only): keep the first block's
        self.writer.write_table(table if table.schema.equals(self.schema) else table.cast(self.schema))

    def close(self, *, failed: bool = False) -> None:
        """Finish writing; ``failed``: the prediction stopped with an error (this one's is not raised over it)."""
        try:
            self._wait()
        except Exception:
            if not failed:
                raise
        finally:
            self._thread.shutdown(wait=True)
            if self.writer is not None:
                self.writer.close()


class AnnotatedCopy:
    """The input AnnData store (.h5ad file or .zarr store) copied beside the outputs as ``annotated.h5ad`` /
    ``annotated.zarr``, with predictions added in place, block by block.

    Only obs, obsm and uns change; the (possibly huge) matrix is copied as files, never loaded. Every prediction
    column is written into the copy as its blocks arrive (obs columns as the elements anndata reads, added to the
    obs already there), so nothing is held per cell of the query.
    """

    def __init__(self, source: Path, stage: Path, n_cells: int, key: str, classes: list[str], embedding_width: int,
                 predictor: Predictor):
        import anndata.io

        self.zarr = is_zarr_store(source)
        self.path = stage / ("annotated.zarr" if self.zarr else "annotated.h5ad")
        if self.zarr:
            shutil.copytree(source, self.path)
            self.consolidated = _has_consolidated_metadata(self.path)
        else:
            shutil.copyfile(source, self.path)
        self.file = open_anndata_store(self.path, "r+")
        self.key, self.n_cells = key, n_cells
        obsm = self.file.require_group("obsm")
        for attribute, value in (("encoding-type", "dict"), ("encoding-version", "0.1.0")):
            if attribute not in obsm.attrs:
                obsm.attrs[attribute] = value
        self.arrays = {name: self.array_element(obsm, name, (n_cells, width), "float32") for name, width in
                       ((f"{key}_probabilities", len(classes)), ("X_scnym", embedding_width))}
        if not blockwise_obs_layout(self.file["obs"]):   # an older layout: rewritten in today's, to add columns to
            obs = read_obs(self.file["obs"])
            obs.index = obs.index.astype(object)
            del self.file["obs"]
            anndata.io.write_elem(self.file, "obs", obs)
        self.obs = self.file["obs"]
        # the obs columns (obs_fields' names): the label and the prediction sets categorical, the others numbers
        self.categorical = {key: ("predicted_label", CategoricalBlocks(self, key, sorted({*classes, UNKNOWN})))}
        new_array = self.array_element
        self.numeric = {f"{key}_confidence": ("confidence", new_array(self.obs, f"{key}_confidence", (n_cells,),
                                                                      "float32"))}
        for name, wanted in (("novelty", predictor.scores_novelty), ("disagreement", predictor.has_disagreement)):
            if wanted:
                self.numeric[f"{key}_{name}"] = (name, new_array(self.obs, f"{key}_{name}", (n_cells,), "float32"))
        if predictor.set_thresholds is not None:
            self.categorical[f"{key}_prediction_set"] = ("prediction_set",
                                                         CategoricalBlocks(self, f"{key}_prediction_set", []))
            self.numeric[f"{key}_set_size"] = ("set_size", new_array(self.obs, f"{key}_set_size", (n_cells,), "int32"))
        new = [*self.categorical, *self.numeric]
        self.obs.attrs["column-order"] = [str(c) for c in self.obs.attrs["column-order"] if str(c) not in new] + new

    def array_element(self, group: Any, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        """A new array element (replacing one of that name), in chunks of 8,192 cells in a zarr store."""
        if name in group:
            del group[name]
        chunks = (min(max(self.n_cells, 1), 8192), *shape[1:])
        array = (group.create_array(name, shape=shape, dtype=dtype, chunks=chunks) if self.zarr
                 else group.create_dataset(name, shape=shape, dtype=dtype))
        array.attrs["encoding-type"], array.attrs["encoding-version"] = "array", "0.2.0"
        return array

    def write(self, rows: slice, result: ChunkResult, table: pd.DataFrame) -> None:
        self.arrays[f"{self.key}_probabilities"][rows] = result.probabilities
        self.arrays["X_scnym"][rows] = result.embedding
        for column, array in self.numeric.values():
            array[rows] = table[column].to_numpy()
        for column, blocks in self.categorical.values():
            blocks.write(rows, table[column].to_numpy())

    def finish(self, classes: list[str], provenance: dict) -> None:
        import anndata.io

        for _, blocks in self.categorical.values():
            blocks.finish()
        uns = self.file.require_group("uns")
        name = f"{self.key}_classes"
        if name in uns:
            del uns[name]
        anndata.io.write_elem(uns, name, np.asarray(classes, dtype=object))
        if self.key in uns:
            del uns[self.key]
        anndata.io.write_elem(uns, self.key, uns_safe(provenance))   # what made these predictions
        if self.zarr:
            if self.consolidated:   # rewritten, or readers that trust it would not see the predictions
                import warnings

                import zarr

                with warnings.catch_warnings():   # zarr warns that v3 has no consolidated metadata in its spec
                    warnings.simplefilter("ignore", UserWarning)
                    zarr.consolidate_metadata(str(self.path))
        else:
            self.file.close()


# codes recoded at a time when a categorical column's categories are put in order at the end
RECODE_SLICE = 1_048_576


class CategoricalBlocks:
    """A categorical obs column of an annotated copy, written a block at a time: codes as blocks arrive (values
    not in ``vocabulary`` are added as they come), and at the end the categories used, sorted as pandas sorts
    them (``pd.Categorical(values)``), the codes recoded to match in slices."""

    def __init__(self, copy: AnnotatedCopy, name: str, vocabulary: list[str]):
        group = copy.obs
        if name in group:
            del group[name]
        self.column = group.create_group(name)
        self.column.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
        self.values: dict[str, int] = {str(v): i for i, v in enumerate(vocabulary)}
        self.used = np.zeros(len(self.values), dtype=bool)
        # the label's vocabulary is known (the classes and Unknown): its codes as small as they can be
        dtype = "int8" if 0 < len(vocabulary) < 128 else "int16" if 0 < len(vocabulary) < 32768 else "int32"
        self.codes = copy.array_element(self.column, "codes", (copy.n_cells,), dtype)
        self.limit = np.iinfo(dtype).max

    def write(self, rows: slice, values: np.ndarray) -> None:
        codes, uniques = pd.factorize(values)
        for value in uniques:
            self.values.setdefault(str(value), len(self.values))
        if len(self.values) - 1 > self.limit:
            raise ScnymError(f"{len(self.values)} distinct values are more than the annotated copy's column "
                             f"{self.column.name!r} can code")
        lookup = np.array([self.values[str(v)] for v in uniques], dtype=np.int64)
        self.codes[rows] = lookup[codes]
        self.used = np.pad(self.used, (0, len(self.values) - len(self.used)))
        self.used[lookup] = True

    def finish(self) -> None:
        import anndata.io

        names = np.asarray(list(self.values), dtype=object)
        order = sorted(np.flatnonzero(self.used), key=lambda i: names[i])
        recode = np.full(len(names), -1, dtype=np.int64)
        recode[order] = np.arange(len(order))
        if not np.array_equal(recode, np.arange(len(names))):
            for start in range(0, self.codes.shape[0], RECODE_SLICE):
                stop = min(start + RECODE_SLICE, self.codes.shape[0])
                self.codes[start:stop] = recode[np.asarray(self.codes[start:stop])]
        anndata.io.write_elem(self.column, "categories", names[order].astype(object))


class MapSample:
    """A seeded sample of the query's cells (at most MAP_CELLS), gathered block by block as they are predicted:
    the embedding map of the report (embedding_map.csv: x, y on the first two principal components, predicted
    type, confidence, novelty, and the query's label when it has one)."""

    def __init__(self, n_cells: int, seed: int):
        rng = np.random.default_rng(seed)
        self.rows = np.sort(rng.choice(n_cells, size=min(MAP_CELLS, n_cells), replace=False))
        self.parts: list[pd.DataFrame] = []
        self.embeddings: list[np.ndarray] = []

    def take(self, rows: slice, result: ChunkResult, ids: pd.Index, truth: Optional[np.ndarray]) -> None:
        local = self.rows[(self.rows >= rows.start) & (self.rows < rows.stop)] - rows.start
        if len(local) == 0 or result.embedding is None:
            return
        self.embeddings.append(result.embedding[local])
        part = {"cell_id": np.asarray(ids)[local]}
        if truth is not None:
            part["label"] = truth[local]
        part.update(predicted=result.labels[local], confidence=result.confidence[local])
        if result.novelty is not None:
            part["novelty"] = result.novelty[local]
        self.parts.append(pd.DataFrame(part))

    def table(self) -> pd.DataFrame:
        if not self.parts:
            return pd.DataFrame(columns=["cell_id", "x", "y", "predicted", "confidence"])
        cells = pd.concat(self.parts, ignore_index=True)
        coordinates = principal_components(np.concatenate(self.embeddings))
        cells.insert(1, "x", coordinates[:, 0])
        cells.insert(2, "y", coordinates[:, 1])
        return cells


class PredictionTotals:
    """What the prediction summary needs of every cell, summed block by block: cells per predicted label, and
    the sums of confidence and set size."""

    def __init__(self) -> None:
        self.per_label: dict[str, int] = {}
        self.sums: dict[str, float] = {"confidence": 0.0, "set_size": 0.0}
        self.n_cells = 0

    def add(self, table: pd.DataFrame) -> None:
        for label, n in table["predicted_label"].value_counts(sort=False).items():
            self.per_label[str(label)] = self.per_label.get(str(label), 0) + int(n)
        for name in self.sums:
            if name in table.columns:
                self.sums[name] += float(table[name].to_numpy().sum(dtype=np.float64))
        self.n_cells += len(table)

    def counts(self) -> pd.Series:
        """Cells per predicted label, most first (ties in the order labels first came)."""
        return pd.Series(self.per_label, dtype=np.int64).sort_values(ascending=False, kind="stable")

    def mean(self, name: str) -> float:
        return self.sums[name] / self.n_cells if self.n_cells else float("nan")


def _has_consolidated_metadata(store: Path) -> bool:
    """Whether a zarr store keeps consolidated metadata (v2: .zmetadata; v3: in the root zarr.json)."""
    if (store / ".zmetadata").is_file():
        return True
    root = store / "zarr.json"
    return root.is_file() and json.loads(root.read_text()).get("consolidated_metadata") is not None


def _check_training_gene_names(config: Config, predictor: Predictor) -> None:
    model = predictor.single
    if config.training_gene_names is None or model is None:
        return
    given = read_gene_list(config.training_gene_names, "--training_gene_names")
    if given != list(model.genes):
        raise ScnymError(
            f"--training_gene_names ({len(given)} genes) differs from the genes the model was trained on "
            f"({len(model.genes)}, in {model.directory}/model.json); omit it: the model's own list is used")


def predict_cell_types(config: Config) -> dict:
    """Run prediction as configured; returns the summary (also in prediction_summary.json)."""
    started = time.perf_counter()
    device = setup_runtime(config)
    predictor = Predictor(config.path("model_path"), config, device)
    _check_training_gene_names(config, predictor)
    with staged_directory(config.path("out_path"), overwrite=config.overwrite, protected=PROTECTED_OUTPUTS,
                          last=(PREDICTIONS_FILE,), writes=writes_outputs(), owned=PREDICTION_OUTPUTS,
                          label="predict") as stage:
        source = open_query(config, config.path("input_counts"))
        try:
            summary = _predict_to(stage, config, predictor, source, started)
        finally:
            if isinstance(source, (H5adChunks, ShardedH5adChunks)):
                source.close()
    log.info("predicted %d cells in %.1f s (%.0f cells/s)", summary["n_cells"], summary["seconds"],
             summary["n_cells"] / max(summary["seconds"], 1e-9))
    return summary


def _predict_to(stage: Path, config: Config, predictor: Predictor, source: CellChunks, started: float) -> dict:
    overlap = predictor.prepare(query_genes(config, source, predictor.model_genes), source)
    predictor.fit_query(source)
    (stage / "gene_overlap.json").write_text(json.dumps(overlap.to_dict(), indent=1))
    classes, key = predictor.classes, config.prediction_key
    annotated = None
    if isinstance(source, ShardedH5adChunks) and config.write_h5ad:
        log.info("%s is a folder of shards: predictions go to predictions.csv (no annotated.h5ad)", source.source)
    if isinstance(source, H5adChunks) and config.write_h5ad:
        width = next(iter(predictor.models.values())).n_hidden
        annotated = AnnotatedCopy(source.path, stage, source.n_cells, key, classes, width, predictor)
    with_embedding = True   # the report's embedding map takes a sample of every block
    sample = MapSample(source.n_cells, config.seed)
    predictions = CsvBlocks(stage / (PREDICTIONS_FILE + ".part"))
    logits_csv = CsvBlocks(stage / "logits.csv") if config.write_logits else None
    embedding_csv = CsvBlocks(stage / "embedding.csv") if config.write_embedding else None
    totals = PredictionTotals()
    # every per-cell result is written or tallied block by block, so memory does not grow with the number of cells
    # the query's labels, when it has them, are read block by block with the cells' ids
    labeled = config.lower_group in source.runs.columns
    if not labeled and config.lower_group != Config.__dataclass_fields__["lower_group"].default:
        # a column asked for by name and not there: likely a typo, and the scores the user wants are missing
        close = difflib.get_close_matches(config.lower_group, source.runs.columns, n=1)
        log.warning("%s has no column %r (--lower_group): the predictions are not scored against known labels%s",
                    source.source, config.lower_group, f"; did you mean {close[0]!r}?" if close else "")
    with_sets = predictor.set_thresholds is not None
    tally = LabeledTally(classes, with_sets=with_sets) if labeled else None
    kind = config.input_normalization
    writers = [writer for writer in (predictions, logits_csv, embedding_csv) if writer]
    try:
        for block in iterate_predictions(predictor, source, config, with_embedding=with_embedding,
                                         obs_columns=[config.lower_group] if labeled else []):
            rows, result, kind, ids = block.rows, block.result, block.kind, block.obs.index
            table = predictions_table(ids, result.labels, result.confidence, result.probabilities, classes,
                                      extra=result.extra_columns(classes))
            totals.add(table)
            block_truth = None
            if tally is not None:
                # a str per distinct label, not per cell
                block_truth = per_cell_strings(block.obs[config.lower_group], strip=False)
                in_set = (None if result.sets is None else
                          true_class_in_set(result.sets, pd.Index(classes).get_indexer(block_truth)))
                tally.add(block_truth, result.labels, result.confidence, in_set,
                          table["set_size"].to_numpy() if with_sets else None)
            predictions.write(table)
            if logits_csv:
                logits = pd.DataFrame(result.logits, columns=[f"logit_{c}" for c in classes])
                logits_csv.write(pd.concat([table[["cell_id"]], logits], axis=1))
            if embedding_csv and result.embedding is not None:
                columns = [f"scnym_{i}" for i in range(result.embedding.shape[1])]
                embedding = pd.DataFrame(result.embedding, columns=columns)
                embedding_csv.write(pd.concat([table[["cell_id"]], embedding], axis=1))
            if annotated:
                annotated.write(rows, result, table)
            sample.take(rows, result, ids, block_truth)
    except BaseException:
        for writer in writers:
            writer.close(failed=True)
        raise
    for writer in writers:
        writer.close()
    if annotated:
        annotated.finish(classes, predictor.provenance(overlap))

    counts = totals.counts()
    summary: dict = {
        "model": predictor.description, "input": str(config.input_counts), "n_cells": int(source.n_cells),
        "input_normalization": kind, "gene_overlap": overlap.to_dict(), **predictor.describe(),
        "unknown_threshold": config.unknown_threshold, "unknown_rate": config.unknown_rate,
        "unknown_cells": int(counts.get(UNKNOWN, 0)),
        "predicted_counts": {str(k): int(v) for k, v in counts.items()},
        "mean_confidence": totals.mean("confidence"),
    }
    if with_sets:
        summary["mean_set_size"] = totals.mean("set_size")
    if tally is not None:
        unknown_labels = tally.other_labels()
        if unknown_labels:
            log.info("%d query cells have labels the model does not know (%s); they count as errors",
                     sum(unknown_labels.values()), ", ".join(sorted(unknown_labels)[:5]))
        evaluation = tally.evaluation()
        write_labeled_report(stage, evaluation, f"query vs {config.lower_group!r}")
        metrics = evaluation.metrics
        summary["metrics_vs_" + config.lower_group] = metrics
        summary["per_class_vs_" + config.lower_group] = evaluation.per_class.to_dict(orient="records")
        log.info("vs query column %r: accuracy %.4f, balanced accuracy %.4f, macro-F1 %.4f, ECE %.4f (a calibrated "
                 "model ~%.4f at this many cells; per class: per_class_metrics.csv)", config.lower_group,
                 metrics["accuracy"], metrics["balanced_accuracy"], metrics["macro_f1"], metrics["ece"],
                 metrics["ece_floor"])
        if with_sets:
            log.info("prediction sets at coverage %g: %.1f%% hold the true class, %.2f classes on average",
                     config.coverage, 100 * metrics["coverage"], metrics["mean_set_size"])
        missed = [r for r in summary["per_class_vs_" + config.lower_group]
                  if r["in_reference"] and r["support"] and r["recall"] < 0.5]
        if missed:
            log.warning("classes found in under half of their query cells: %s", ", ".join(
                f"{r['class']} {r['recall']:.0%} of {r['support']}" for r in missed))
    summary["seconds"] = round(time.perf_counter() - started, 2)  # model loading to last output block
    sample.table().to_csv(stage / EMBEDDING_MAP_FILE, index=False)
    write_prediction_report(stage, summary, config.lower_group if tally is not None else None)
    (stage / "prediction_summary.json").write_text(json.dumps(summary, indent=1))
    (stage / (PREDICTIONS_FILE + ".part")).rename(stage / PREDICTIONS_FILE)
    log.info("predicted %d cells: %s", source.n_cells, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return summary


