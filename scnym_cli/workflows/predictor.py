"""The prediction core shared by the command line and the Python API: a :class:`Predictor` loads a model (or a
run's ensemble, or a tissue-specific run's routed models), aligns each query block to the model's genes and
predicts it; :func:`iterate_predictions` streams a query block by block; :func:`predict_in_memory` gathers
every block for the API, and :func:`annotate` writes the results into an AnnData.

What the command writes to files is workflows/predict.py.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._version import __version__
from ..config import Config
from ..data import UNKNOWN
from ..data.genes import GeneOverlap, reindex_columns, require_overlap
from ..data.labels import read_groups
from ..data.normalize import normalize
from ..data.stream import CellChunks, in_background, sample_cells
from ..errors import ScnymError
from ..memory import release_freed_memory
from ..report import LabeledEvaluation, evaluate_labeled, predictions_table, write_labeled_report
from ..store import covariates_for, routing_of
from ..train.conformal import (ConformalCalibration, DomainWeights, prediction_sets, set_labels, true_class_in_set,
                               with_predicted_class)
from ..train.device import inference_dtype
from ..train.novelty import CLUSTER_CELLS, QueryClusters, QueryNovelty
from .annotation import annotate
from .ensemble import Ensemble
from .inputs import query_genes, query_kind

log = logging.getLogger(__name__)

# query cells a domain classifier is fit on for weighted sets (a random draw), and the fewest it needs
SHIFT_QUERY_CELLS = 2000
MIN_SHIFT_QUERY_CELLS = 20


@dataclass
class ChunkResult:
    probabilities: np.ndarray       # cells x classes (calibrated)
    logits: np.ndarray              # cells x classes (NaN for classes a routed model lacks)
    labels: np.ndarray              # predicted class names ('Unknown' below the threshold)
    confidence: np.ndarray
    embedding: Optional[np.ndarray]
    novelty: Optional[np.ndarray] = None  # how unlike known reference cells (None: a model has no reference)
    disagreement: Optional[np.ndarray] = None  # share of an ensemble's models calling another class (None: one model)
    sets: Optional[np.ndarray] = None     # cells x classes, True in the cell's conformal set (None: no --coverage)

    def extra_columns(self, classes: list[str]) -> dict[str, np.ndarray]:
        """The per-cell columns after confidence that this prediction has: novelty, disagreement (an ensemble),
        prediction_set (classes joined by '|') and set_size (with --coverage)."""
        columns = {name: value for name, value in (("novelty", self.novelty), ("disagreement", self.disagreement))
                   if value is not None}
        if self.sets is not None:
            columns.update(prediction_set=set_labels(self.sets, classes), set_size=self.sets.sum(axis=1))
        return columns


class Predictor:
    """A model, or a tissue-specific run's models, ready to predict blocks of one dataset.

    Call :meth:`prepare` once with the dataset's genes and metadata (gene overlap is checked,
    tissue groups and covariates are resolved), then :meth:`predict` per block.
    """

    def __init__(self, model_path: Path, config: Config, device):
        self.config, self.device = config, device
        self.dtype = inference_dtype(device, config.inference_precision)
        # unweighted sets of a run whose fold models all predict are cross-conformal (train/conformal.py)
        ensemble = partial(Ensemble, choice=config.ensemble, device=device, dtype=self.dtype,
                           cross_conformal=config.coverage is not None and not config.weighted_sets)
        self.routing = routing_of(model_path)
        if self.routing:
            self.column = self.routing["column"]
            self.models = {g: ensemble(Path(model_path) / d) for g, d in self.routing["models"].items()}
            self.classes = sorted(set().union(*(m.classes for m in self.models.values())))
        else:
            self.column = None
            self.models = {None: ensemble(model_path)}
            self.classes = list(self.models[None].classes)
        single = None if self.routing else self.models[None]
        self.description = str(single.directory if single and len(single.members) == 1 else model_path)
        self.scores_novelty = all(m.novelty is not None for m in self.models.values())
        self.has_disagreement = all(len(m.members) > 1 for m in self.models.values())
        if config.unknown_rate is not None and not self.scores_novelty:
            old = [str(m.directory) for m in self.models.values() if m.novelty is None]
            raise ScnymError(f"--unknown_rate needs a model with a novelty reference, and {old[0]} was trained "
                             "without one (an older scnym): retrain it, or use --unknown_threshold")
        # each model's novelty above which a cell is Unknown (none: no --unknown_rate)
        self.unknown_above: Optional[dict[Any, float]] = None
        if config.unknown_rate is not None:
            self.unknown_above = {g: m.novelty.threshold(config.unknown_rate) for g, m in self.models.items()
                                  if m.novelty is not None}
        # each model's novelty scale against this query (fit_query; none: a model saved without one scores the
        # distance alone) and its clusters of the query that novelty is averaged over (none: each cell alone)
        self.novelty_scales: dict[Any, QueryNovelty] = {}
        self.clusters: dict[Any, QueryClusters] = {}
        # each model's conformal score threshold per class (none: no --coverage)
        self.set_thresholds: Optional[dict[Any, np.ndarray]] = None
        # weighted sets: each model's calibration sample, and (fit_shift) its domain classifier against the query
        self.shift: Optional[dict[Any, tuple[ConformalCalibration, np.ndarray]]] = None
        self.domain_weights: dict[Any, Optional[DomainWeights]] = {}
        if config.coverage is not None:
            calibrations = {g: m.calibration for g, m in self.models.items() if m.calibration is not None}
            old = [str(m.directory) for g, m in self.models.items() if g not in calibrations]
            if old:
                raise ScnymError(f"--coverage needs a model with a conformal calibration set, and {old[0]} was "
                                 "trained without one (an older scnym): retrain it")
            self.set_thresholds = {g: c.thresholds(config.coverage, config.coverage_per_class)
                                   for g, c in calibrations.items()}
            self.shift = {g: m.shift_reference() for g, m in self.models.items()} if config.weighted_sets else None
            for g, calibration in calibrations.items():
                m = self.models[g]
                too_few = calibration.too_few(config.coverage)
                if config.coverage_per_class and len(too_few):
                    log.warning("%s: %d classes have too few calibration cells to be ruled out at coverage %g and "
                                "are in every set: %s", m.path, len(too_few), config.coverage,
                                ", ".join(m.classes[c] for c in too_few[:5]))

    def provenance(self, overlap: GeneOverlap) -> dict[str, Any]:
        """What made a set of predictions, as annotated AnnData files record it in ``uns[key]``: the scnym
        version, the settings (and the number format they resolved to), the model(s) -- each with the checksums
        of its manifest's meaning and of its weights, and of the data it was trained on -- and the gene overlap."""
        models: dict[str, dict] = {}
        for group, ensemble in self.models.items():
            for member in ensemble.members:
                manifest = member.manifest
                # ':' joins a tissue to its model (a '/' would nest groups in an h5ad file)
                name = member.directory.name if group is None else f"{group}:{member.directory.name}"
                models[name] = {"path": str(member.directory), "trained_with": manifest.get("package_version"),
                                "meaning_sha256": manifest.get("meaning_sha256"),
                                "weights_sha256": manifest.get("weights_sha256"),
                                "training_data_sha256": (manifest.get("data_fingerprint") or {}).get("sha256")}
        return {"scnym_version": __version__, "model_path": self.description, "models": models,
                "params": self.config.to_dict(), "gene_overlap": overlap.to_dict(), "classes": list(self.classes),
                "inference_precision": self.precision_name}

    @property
    def precision_name(self) -> str:
        """The number format prediction's products run in (float32, bfloat16, float16)."""
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict:
        """What predicted (for the summary): the models, their temperatures, the prediction sets' calibration."""
        described: dict = {"ensemble": self.config.ensemble, "inference_precision": self.precision_name}
        for group, model in self.models.items():
            entry: dict[str, Any] = {"models": model.names, "temperature": {m.directory.name: m.temperature for m in model.members}}
            if self.scores_novelty:
                # how many query clusters novelty is averaged over (0: each cell's own), the views it reads, and
                # the novelty above which a cell is Unknown
                clusters = self.clusters.get(group)
                entry["novelty_clusters"] = 0 if clusters is None else len(clusters.novelty)
                scale = self.novelty_scales.get(group)
                entry["novelty"] = scale.describe() if scale is not None else {"views": "distance (unscaled)"}
                if self.unknown_above is not None:
                    entry["novelty"]["unknown_above"] = float(self.unknown_above[group])
            if self.set_thresholds is not None:
                # cross-conformal: each fold model's scores ranked among its own held-out cells'; pooled: one
                # calibration set for whichever model predicts (weighted sets are always pooled)
                method = "cross-conformal" if model.cross_conformal is not None else "split conformal"
                entry["calibration"] = {"cells": model.calibration_source, "n_cells": len(model.calibration or ()),
                                        "method": method}
                domain = self.domain_weights.get(group)
                if domain is not None:
                    w = domain.calibration_weights
                    # how many calibration cells the weighting leaves in effect (few: sets near-full)
                    entry["calibration"]["weighted"] = {"n_cells": int(len(w)),
                                                        "effective_cells": float(w.sum() ** 2 / (w ** 2).sum())}
            if group is None:
                described.update(entry)
            else:
                described.setdefault("per_group", {})[str(group)] = entry
        if self.set_thresholds is not None:
            described.update(coverage=self.config.coverage, coverage_per_class=self.config.coverage_per_class,
                             weighted_sets=self.config.weighted_sets)
        return described

    @property
    def model_genes(self) -> list[str]:
        """The genes of the model(s), in the naming a query's genes are translated to."""
        return list(dict.fromkeys(g for m in self.models.values() for g in m.genes))

    @property
    def single(self) -> Optional[Ensemble]:
        return None if self.routing else self.models[None]

    def prepare(self, genes: pd.Index, query: CellChunks) -> GeneOverlap:
        self.genes = pd.Index(genes)
        source = query.source
        overlaps = {g: require_overlap(self.genes, m.genes, min_overlap=self.config.min_gene_overlap, what="query",
                                       source=source) for g, m in self.models.items()}
        self.groups: Optional[np.ndarray] = None
        self.covariates: dict[Any, Optional[np.ndarray]] = {g: None for g in self.models}
        if not self.routing and not any(m.manifest.get("covariates") for m in self.models.values()):
            # nothing of the query's metadata is needed per cell: a streamed query's stays in its store
            return next(iter(overlaps.values()))
        obs = query.obs
        if self.routing:
            groups = read_groups(obs, self.column, source)
            unseen = ~pd.Index(groups).isin(list(self.models))
            if unseen.any():
                names = ", ".join(sorted(set(groups[unseen]))[:5])
                raise ScnymError(
                    f"{int(unseen.sum())} query cells belong to {self.column!r} groups without a model ({names}); "
                    f"models exist for {', '.join(self.models)}: remove those cells or predict them with a "
                    "tissue-independent model")
            self.groups = groups
        self.covariates.update({g: covariates_for(m.manifest, obs, source) for g, m in self.models.items()})
        return next(iter(overlaps.values()))

    def fit_query(self, source: CellChunks) -> None:
        """What needs the query as a whole, before its blocks are predicted: the domain classifier of weighted
        sets (--weighted_sets), the novelty's scale and the clusters it is averaged over (--novelty_clusters)."""
        if self.shift is not None:
            self.fit_shift(source)
        if self.scores_novelty:
            self.fit_novelty(source)

    def _group_rows(self, group: Any, rows: np.ndarray) -> np.ndarray:
        """The positions in ``rows`` (cells of the query) of the cells the model of ``group`` predicts."""
        return np.arange(len(rows)) if group is None or self.groups is None \
            else np.flatnonzero(self.groups[rows] == group)

    def _sample(self, source: CellChunks, cells: int) -> tuple[np.ndarray, sp.csr_matrix, pd.Index]:
        """(rows, normalized matrix, its genes) of a seeded sample of at most ``cells`` query cells
        (:func:`sample_cells`: runs of consecutive cells, no pass over the query). Each run is normalized over the
        query's genes, then only the models' genes are kept (the first of a duplicated name, as reindex_columns
        takes it)."""
        config = self.config
        kind = query_kind(source, config, announce=False)
        columns = np.flatnonzero(self.genes.isin(self.model_genes) & ~self.genes.duplicated())

        def normalized(block: sp.csr_matrix) -> sp.csr_matrix:
            X, _ = normalize(block, config.input_normalization, kind=kind, source=source.source, copy=False,
                             announce=False)
            return X[:, columns]

        rows, X = sample_cells(source, cells, config.seed, normalized)
        return rows, X, self.genes[columns]

    def _embed_sample(self, group: Any, rows: np.ndarray, X: sp.csr_matrix, genes: pd.Index,
                      mine: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """The sampled cells ``mine`` (positions in ``rows``) on the genes of the model of ``group``, and its
        embedding of them."""
        model = self.models[group]
        aligned = reindex_columns(X[mine], genes, pd.Index(model.genes))
        covariates = self.covariates[group]
        return aligned, model.embed(aligned, self.device, covariates=None if covariates is None
                                    else covariates[rows[mine]])

    def fit_novelty(self, source: CellChunks) -> None:
        """Each model's novelty against a sample of the query's cells (its scale: train/novelty.py QueryNovelty,
        and the Unknown threshold of --unknown_rate on it), then its clusters of the sample in gene space, each
        scored by the mean novelty of its cells (QueryClusters; with --novelty_clusters > 0)."""
        config = self.config
        rows, X, genes = self._sample(source, CLUSTER_CELLS)
        self.novelty_scales, self.clusters = {}, {}
        for group, model in self.models.items():
            mine = self._group_rows(group, rows)
            if model.novelty is None or len(mine) == 0:
                continue
            aligned, embedding = self._embed_sample(group, rows, X, genes, mine)
            scale = QueryNovelty.fit(model.novelty, embedding, config.seed)
            if scale is not None:
                self.novelty_scales[group] = scale
                if self.unknown_above is not None and config.unknown_rate is not None:
                    self.unknown_above[group] = scale.threshold(config.unknown_rate)
            if config.novelty_clusters <= 0:
                continue
            clusters = QueryClusters.fit(aligned, self._cell_novelty(group, embedding), config.novelty_clusters,
                                         config.seed)
            if clusters is None:
                log.info("%s: %d sampled query cells are too few to cluster; each cell's novelty is its own",
                         model.path, len(mine))
                continue
            self.clusters[group] = clusters

    def _cell_novelty(self, group: Any, embedding: np.ndarray) -> np.ndarray:
        """Each cell's own novelty by the model of ``group``: on the query's scale (fit_novelty), or the distance
        alone for a model saved without one."""
        scale = self.novelty_scales.get(group)
        if scale is not None:
            return scale.score(embedding, self.dtype)
        reference = self.models[group].novelty
        if reference is None:
            raise ValueError("novelty needs a model with a novelty reference")
        return reference.score(embedding, self.dtype)

    def fit_shift(self, source: CellChunks) -> None:
        """Weighted sets: each model's embedding of a seeded sample of the query's cells, and a domain classifier
        of those against the model's calibration sample."""
        config, shift = self.config, self.shift
        if shift is None:
            raise ValueError("fit_shift is for weighted sets: the Predictor was built without --weighted_sets")
        rows, X, genes = self._sample(source, SHIFT_QUERY_CELLS)
        self.domain_weights = {}
        for group in self.models:
            mine = self._group_rows(group, rows)
            if len(mine) < MIN_SHIFT_QUERY_CELLS:
                log.warning("%s: %d query cells are too few to weigh calibration cells by their likeness; its sets "
                            "are unweighted", self.models[group].path, len(mine))
                self.domain_weights[group] = None
                continue
            _, query = self._embed_sample(group, rows, X, genes, mine)
            _, reference = shift[group]
            self.domain_weights[group] = DomainWeights.fit(reference, query, config.seed)

    def predict(self, rows: slice, X: sp.csr_matrix, with_embedding: bool) -> ChunkResult:
        """Predict the cells ``rows`` of the dataset, given as ``X`` (ln(CPM+1) over the dataset's genes)."""
        n = X.shape[0]
        probabilities = np.zeros((n, len(self.classes)), dtype=np.float32)
        logits = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        embedding = None
        novelty = np.full(n, np.nan, dtype=np.float32) if self.scores_novelty else None
        disagreement = np.full(n, np.nan, dtype=np.float32) if self.has_disagreement else None
        sets = np.zeros((n, len(self.classes)), dtype=bool) if self.set_thresholds is not None else None
        unknown = np.zeros(n, dtype=bool)
        for group, model in self.models.items():
            local = np.arange(n) if group is None or self.groups is None else np.flatnonzero(self.groups[rows] == group)
            part = X if group is None else X[local]   # a single model reads the block itself, uncopied
            if part.shape[0] == 0:
                continue
            model_genes = pd.Index(model.genes)
            aligned = part if self.genes.equals(model_genes) else reindex_columns(part, self.genes, model_genes)
            covariates = self.covariates[group]
            if covariates is not None:
                covariates = covariates[rows][local]
            domain = self.domain_weights.get(group) if self.shift is not None else None
            clusters = self.clusters.get(group)
            # a cell's own novelty needs its embedding; its cluster's needs only its expression
            cell_novelty = novelty is not None and clusters is None
            outputs = model.predict(aligned, self.device, covariates=covariates,
                                    with_embedding=with_embedding or cell_novelty or domain is not None)
            if novelty is not None and model.novelty is not None:
                if clusters is not None:
                    novelty[local] = clusters.score(aligned)
                elif outputs.embedding is not None:
                    novelty[local] = self._cell_novelty(group, outputs.embedding)
                if self.unknown_above is not None:
                    unknown[local] = novelty[local] > self.unknown_above[group]
            if disagreement is not None:
                disagreement[local] = outputs.disagreement
            columns = pd.Index(self.classes).get_indexer(model.classes)
            probabilities[np.ix_(local, columns)] = outputs.probabilities
            logits[np.ix_(local, columns)] = outputs.logits
            if sets is not None and self.set_thresholds is not None and self.config.coverage is not None:
                thresholds = self.set_thresholds[group]
                if domain is not None and self.shift is not None and outputs.embedding is not None:
                    # each cell's own thresholds, from calibration cells weighted by its likeness
                    calibration, _ = self.shift[group]
                    thresholds = calibration.weighted_thresholds(
                        domain.calibration_weights, domain.weights(outputs.embedding), self.config.coverage,
                        self.config.coverage_per_class)
                    sets[np.ix_(local, columns)] = prediction_sets(outputs.probabilities, thresholds)
                elif model.cross_conformal is not None and outputs.fold_probabilities is not None:
                    member_sets = model.cross_conformal.sets(outputs.fold_probabilities, self.config.coverage,
                                                             self.config.coverage_per_class)
                    sets[np.ix_(local, columns)] = with_predicted_class(member_sets, outputs.probabilities)
                else:
                    sets[np.ix_(local, columns)] = prediction_sets(outputs.probabilities, thresholds)
            if with_embedding and outputs.embedding is not None:
                if embedding is None:
                    embedding = np.zeros((n, outputs.embedding.shape[1]), dtype=np.float32)
                embedding[local] = outputs.embedding
        confidence = probabilities.max(axis=1)
        labels = np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)]
        if self.config.unknown_threshold > 0:
            labels = np.where(confidence < self.config.unknown_threshold, UNKNOWN, labels)
        labels = np.where(unknown, UNKNOWN, labels)
        return ChunkResult(probabilities, logits, labels, confidence, embedding if with_embedding else None, novelty,
                           disagreement, sets)


def prediction_workers(device) -> int:
    """Blocks predicted at once: two on a CPU with two or more threads, else one.

    One block's forward pass leaves cores idle (its small per-layer operations wait for both cores while the reader
    thread holds one); two blocks at once, each on half the threads, fill them. 1M cells x 2,000 genes on 2 cores,
    two runs each: 56,948 / 57,405 cells/s against 44,663 / 43,937 for one block on both threads, predictions
    identical."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


@dataclass
class PredictedBlock:
    rows: slice               # the block's cells, positions in the query
    obs: pd.DataFrame         # their ids (the index) and the metadata columns asked for
    result: ChunkResult
    kind: str                 # the query's normalization


def iterate_predictions(predictor: Predictor, source: CellChunks, config: Config, *, with_embedding: bool,
                        obs_columns: Sequence[str] = ()) -> Iterator[PredictedBlock]:
    """The query block by block: normalize over the query's genes, then predict. Each block's cell ids and
    ``obs_columns`` are read with its expression (from the store, for a streamed query), so nothing is held per
    cell of the whole query."""
    kind = query_kind(source, config)

    def normalized() -> Iterator[tuple[slice, sp.csr_matrix, pd.DataFrame]]:
        runs = source.runs
        for index, (rows, block) in enumerate(source.chunks(config.prediction_chunk_size)):
            X, _ = normalize(block, config.input_normalization, kind=kind, source=source.source, copy=False,
                             announce=index == 0)
            obs = pd.DataFrame({name: runs.column(name, rows.start, rows.stop).to_numpy() for name in obs_columns},
                               index=runs.ids(rows.start, rows.stop), columns=list(obs_columns))
            yield rows, X, obs

    empty = 0
    workers = prediction_workers(predictor.device)
    # each block in flight gets its share of the threads: together they use as many as were configured. The count
    # is set in each worker thread (torch's intra-op count is the calling thread's own, OpenMP's per-thread
    # setting), so the caller's thread keeps its count, also while this generator waits between blocks
    share = max(1, torch.get_num_threads() // workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="scnym-predict", initializer=torch.set_num_threads,
                            initargs=(share,)) as pool:
        in_flight: deque = deque()

        def oldest() -> PredictedBlock:
            done_rows, obs, done = in_flight.popleft()
            return PredictedBlock(done_rows, obs, done.result(), kind)

        try:
            for rows, X, obs in in_background(normalized()):   # the next block is read while these are predicted
                empty += int((np.diff(X.indptr) == 0).sum())
                in_flight.append((rows, obs, pool.submit(predictor.predict, rows, X, with_embedding)))
                if len(in_flight) == workers:
                    yield oldest()
                    release_freed_memory()   # the block's arrays are freed: memory stays flat however many cells stream
            while in_flight:
                yield oldest()
        finally:
            for _, _, pending in in_flight:   # a failed or abandoned stream: blocks not yet started are dropped
                pending.cancel()
    if empty:
        log.warning("%s: %d cells have no expression at all; their predictions are meaningless", source.source, empty)



# ---------------------------------------------------------------------- in memory (Python API)
@dataclass
class Predictions:
    """Per-cell results on one dataset, in its cell order: what :meth:`scnym_cli.Model.predict` returns (and
    what scnym_api writes into an AnnData)."""

    cell_ids: pd.Index
    labels: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    embedding: Optional[np.ndarray]
    classes: list[str]
    overlap: GeneOverlap
    extra: dict[str, np.ndarray]          # novelty, disagreement, prediction_set, set_size: those predicted
    sets: Optional[np.ndarray] = None     # cells x classes (with --coverage)
    provenance: dict[str, Any] = field(default_factory=dict)   # Predictor.provenance: written to uns[key]

    def table(self) -> pd.DataFrame:
        """cell_id, predicted_label, confidence, [novelty, disagreement, prediction_set, set_size,] prob_<class>..."""
        return predictions_table(self.cell_ids, self.labels, self.confidence, self.probabilities, self.classes,
                                 extra=self.extra)

    def to_anndata(self, adata, key: str = "scNym") -> None:
        """Write the predictions into ``adata`` (in place; its cells in this order): ``obs[key]``,
        ``obs[key + "_confidence"]``, the other per-cell columns, ``obsm[key + "_probabilities"]``,
        ``obsm["X_scnym"]``, ``uns[key + "_classes"]``."""
        if adata.n_obs != len(self.cell_ids) or not (adata.obs_names == self.cell_ids).all():
            raise ScnymError(f"these predictions are of {len(self.cell_ids)} other cells than the AnnData's "
                             f"{adata.n_obs}; write them into the AnnData they were made from")
        annotate(adata, key=key, predictions=self)

    def evaluate(self, truth) -> LabeledEvaluation:
        """Scores against known labels (one per cell, e.g. ``adata.obs["cell_type"]``): accuracy, balanced
        accuracy, macro-F1, ECE, the per-class table, the confusion matrix, the reliability bins and, with
        prediction sets, their coverage."""
        truth = np.asarray(truth, dtype=str)
        if len(truth) != len(self.labels):
            raise ScnymError(f"truth has {len(truth)} labels for {len(self.labels)} predicted cells")
        with_sets = {}
        if self.sets is not None:
            with_sets = {"in_set": true_class_in_set(self.sets, pd.Index(self.classes).get_indexer(truth)),
                         "set_size": self.extra["set_size"]}
        return evaluate_labeled(truth, self.labels, self.confidence, self.classes, **with_sets)

    def write_report(self, truth, directory) -> LabeledEvaluation:
        """:meth:`evaluate`, written to ``directory`` as the command line writes it for a labeled query:
        per_class_metrics.csv, confusion_matrix.csv / .png, reliability.csv / reliability_diagram.png."""
        evaluation = self.evaluate(truth)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_labeled_report(directory, evaluation, "predictions")
        return evaluation


def predict_in_memory(predictor: Predictor, source: CellChunks, config: Config) -> Predictions:
    """Every block's results gathered into arrays."""
    overlap = predictor.prepare(query_genes(config, source, predictor.model_genes), source)
    predictor.fit_query(source)
    parts = [block.result for block in iterate_predictions(predictor, source, config, with_embedding=True)]
    classes = list(predictor.classes)

    def stack(name):
        return np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros((0, len(classes)))

    columns = [p.extra_columns(classes) for p in parts]
    extra = {name: np.concatenate([c[name] for c in columns]) for name in (columns[0] if columns else {})}
    return Predictions(source.obs.index, stack("labels"), stack("confidence"), stack("probabilities"),
                       stack("logits"), stack("embedding"), classes, overlap, extra,
                       stack("sets") if predictor.set_thresholds is not None else None,
                       predictor.provenance(overlap))
