"""Novelty scores, leave one class out (issue 11): which score tells cells of a type the reference lacks?

For every split and every query type with at least ``--min_cells`` query cells that the reference has,
that type is removed from the reference; the default semi-supervised model is trained on the rest (the
whole query as target data, as a user would) and predicts the query. Each candidate score then ranks the
removed type's query cells against the cells of types the model knows (AUROC; 1 = every novel cell scored
above every known one). Types the reference lacks to begin with (neutrophils across species, dendritic
and CD34+ cells in pbmc68k) are scored the same way, by the default model of the whole reference.

Scores, each higher = more novel:
* ``1 - confidence``: one minus the calibrated top probability (what --unknown_threshold uses);
* ``energy``: -logsumexp(logits) (Liu et al. 2020);
* ``knn``: mean cosine distance to the 10 nearest reference cells in the embedding (the cell's own);
* ``prototype``: cosine distance to the nearest class centroid of the reference in the embedding;
* ``knn by cluster``: ``knn`` averaged over the cell's cluster of query cells (16 k-means clusters in the query's
  own gene space, as scnym_cli.train.novelty.QueryClusters fits them), scnym's ``novelty`` before the mixing view;
* ``mixing by cluster``: the share of query cells among a cell's 10 nearest neighbours in the embedding, drawn from
  the bank and as many query cells (a known type's query cells lie among reference cells once adapted; a new
  type's sit among their own), averaged over the cell's cluster;
* ``novelty``: scnym's ``novelty`` column (train/novelty.py QueryNovelty): the mean of the cell's distance and
  mixing quantiles among the model-selection cells' (the mixing view read from each cell's own dataset),
  averaged over scnym's query clusters: what ``--unknown_rate`` calls Unknown on;
* ``profile by cluster``: 1 - the highest correlation of the cluster's mean expression with a reference type's
  (each gene standardized within its own dataset), over the model's genes;
* ``knn + profile``: the sum of the two clusters' ranks among the query's cells (no absolute scale: no
  threshold can be set from the reference for it);
* ``markers by cluster``: the share of the reference's marker fold change (the type the model calls most of
  the cluster's cells: its 20 genes most above every other reference type) that the cluster lacks against
  the rest of the query;
* ``knn + markers``: the sum of the ranks of ``knn by cluster`` and ``markers by cluster``.
The reference embeddings are those of the training reference (at most 2,000 cells, drawn per class as scnym
draws the bank it keeps with a model).

Every type is scored by a model per seed (``--seeds``, 0 1 2: the figures are means over them, with the spread
of ``novelty``), and by the seeds' models together, as a deep ensemble would (Lakshminarayanan et al. 2017):
``novelty, N models`` and ``knn by cluster, N models``: the models' scores averaged; ``1 - confidence, N
models``: of their averaged probabilities; ``disagreement, N models``: the share of models whose call differs
from the average's, averaged over the cell's query cluster (one cell's share takes only N + 1 values).

For the scores ``--unknown_rate`` has used (``knn``, the default before query clusters, and ``knn by cluster``,
the default before the mixing view, both thresholded at the model-selection cells' distance quantile;
``novelty``, today's), the shares of known and of novel cells called Unknown at ``--unknown_rate 0.05`` are
reported too.

    python bench/novelty.py --num_threads 1 [--seeds 0 1 2] [--splits ...]
    # on 2 cores: two halves of the splits side by side (--out scratch), then the whole, reusing their models

Writes bench/results/novelty.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import QUICK_FLAGS, defaults_fingerprint, run  # noqa: E402
from common import (RESULTS, SPLITS, WORK, machine, materialize, provenance, scnym_command,  # noqa: E402
                    shared_genes_file, write_json, write_markdown)
from scnym_cli.train.novelty import BANK_CELLS, K_NEAREST as K  # noqa: E402

SCORES = ["1 - confidence", "energy", "knn", "prototype", "knn by cluster", "mixing by cluster", "novelty",
          "profile by cluster", "knn + profile", "markers by cluster", "knn + markers"]
# neighbours of a cell among the bank and a sample of the query, for ``mixing``
MIXING_NEIGHBOURS = 10
# the scores with a threshold from the reference's held-out cells: (score, the cell-level score thresholded)
CALLED = ["knn", "knn by cluster", "novelty"]
RATE = 0.05
# the scores of the seeds' models together (see the docstring), named for n models
ENSEMBLE_SCORES = ["novelty, {n} models", "knn by cluster, {n} models", "1 - confidence, {n} models",
                   "disagreement, {n} models"]
# what a model's files hold beyond what its command and the defaults say: models saved before scnym kept
# model-selection embeddings with the novelty reference are retrained
MODEL_FILES = {"novelty_reference": "with model-selection embeddings"}
# a type the default classifies this well when the reference has it (recall, bench/results/accuracy.json) is one
# a novelty score can be asked to find when it does not
RECOGNIZED_RECALL = 0.9


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def novelty_scores(logits: np.ndarray, confidence: np.ndarray, embedding: np.ndarray, bank: np.ndarray,
                   bank_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate score of the query cells (higher = more novel); ``knn`` is scnym's own
    (scnym_cli.train.novelty, what --unknown_rate uses)."""
    import torch

    from scnym_cli.train.novelty import NoveltyReference

    knn = NoveltyReference(torch.from_numpy(_unit(bank).astype(np.float32)), np.zeros(0), K).score(embedding)
    centroids = _unit(np.stack([_unit(bank)[bank_labels == c].mean(axis=0) for c in np.unique(bank_labels)]))
    prototype = (1 - _unit(embedding) @ centroids.T).min(axis=1)
    energy = -torch.logsumexp(torch.from_numpy(logits), dim=1).numpy()
    return {"1 - confidence": 1 - confidence, "energy": energy, "knn": knn, "prototype": prototype}


def mixing_by_cluster(embedding: np.ndarray, bank: np.ndarray, clusters: np.ndarray, seed: int = 0) -> np.ndarray:
    """``mixing by cluster`` (see the docstring; the benchmark's own, from the query's side only); ``clusters``:
    each query cell's cluster."""
    query = _unit(embedding)
    sample = np.random.default_rng(seed).permutation(len(query))[:len(bank)]
    pool = np.vstack([_unit(bank), query[sample]])
    from_reference = np.r_[np.ones(len(bank)), np.zeros(len(sample))]
    position = np.full(len(query), -1)
    position[sample] = np.arange(len(sample))
    shares = []
    for start in range(0, len(query), 2048):
        similarity = query[start:start + 2048] @ pool.T
        rows = np.flatnonzero(position[start:start + 2048] >= 0)
        similarity[rows, len(bank) + position[start + rows]] = -np.inf   # a sampled cell is not its own neighbour
        nearest = np.argpartition(-similarity, MIXING_NEIGHBOURS, axis=1)[:, :MIXING_NEIGHBOURS]
        shares.append(1 - from_reference[nearest].mean(axis=1))
    return pd.Series(np.concatenate(shares)).groupby(clusters).transform("mean").to_numpy()


def cluster_scores(model: Path, reference: Path, query: Path, label: str, cell_ids: pd.Index,
                   predicted: np.ndarray, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(scores of each query cell's cluster, the cell's cluster): 16 k-means clusters of the query in its own gene
    space, as scnym's, over the model's genes:

    * ``profile by cluster``: 1 - the highest correlation of the cluster's mean standardized expression (each
      gene standardized within its own dataset) with a reference type's;
    * ``markers by cluster``: the share of the reference's marker fold change the cluster lacks, for the type the
      model calls most of its cells: that type's markers (the 20 genes most above every other reference type,
      ln(CPM+1)) and their fold change over the rest of the reference, against the cluster's over the rest of
      the query (a known type's cluster shows its markers, ~0; a new type called a known one lacks them, ~1).
    """
    import anndata as ad

    from scnym_cli.data.genes import reindex_columns
    from scnym_cli.data.normalize import normalize
    from scnym_cli.train.novelty import QueryClusters

    genes = pd.Index(json.loads((model / "all_data" / "model.json").read_text())["genes"])

    def expression(path: Path, cells=None):
        """(ln(CPM+1) over the model's genes, dense; its sparse form; the AnnData)"""
        adata = ad.read_h5ad(path)
        if cells is not None:
            adata = adata[adata.obs_names.get_indexer(cells)]
        X, _ = normalize(adata.X, "auto", source=str(path), copy=True, announce=False)
        X = reindex_columns(X.tocsr(), adata.var_names, genes)
        return X.toarray(), X, adata

    def standardized(dense: np.ndarray) -> np.ndarray:
        return (dense - dense.mean(0)) / np.maximum(dense.std(0), 1e-3)

    reference_dense, _, reference_data = expression(reference)
    labels = reference_data.obs[label].astype(str).to_numpy()
    types = np.unique(labels)
    reference_z = standardized(reference_dense)
    profiles = np.stack([reference_z[labels == c].mean(0) for c in types])
    query_dense, query_X, _ = expression(query, cell_ids)
    query_z = standardized(query_dense)
    clusters = QueryClusters.fit(query_X, np.zeros(query_X.shape[0]), 16, seed)
    assigned = clusters.assign(query_X)
    n_clusters = len(clusters.novelty)
    means = np.stack([query_z[assigned == c].mean(0) if (assigned == c).any() else np.zeros(query_z.shape[1])
                      for c in range(n_clusters)])

    def centred(rows: np.ndarray) -> np.ndarray:
        rows = rows - rows.mean(axis=1, keepdims=True)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    profile = (1 - (centred(means) @ centred(profiles).T).max(axis=1))[assigned]

    # markers of each reference type: most above the highest other type's mean
    type_means = np.stack([reference_dense[labels == c].mean(0) for c in types])
    markers, reference_change = {}, {}
    for i, kind in enumerate(types):
        others = np.delete(type_means, i, axis=0)
        specificity = type_means[i] - (others.max(0) if len(others) else 0)
        top = np.argsort(-specificity)[:20]
        top = top[specificity[top] > 0]
        if len(top) == 0:
            top = np.argsort(-specificity)[:1]
        rest = reference_dense[:, top][labels != kind].mean(0) if (labels != kind).any() else 0
        markers[kind], reference_change[kind] = top, type_means[i, top] - rest
    marker_score = np.zeros(n_clusters)
    for c in range(n_clusters):
        cells = assigned == c
        if not cells.any():
            continue
        called = pd.Series(predicted[cells]).value_counts().index[0]
        if called not in markers:
            continue
        top = markers[called]
        genes_of_type = query_dense[:, top]   # the type's markers only: no copy of the whole query per cluster
        inside = genes_of_type[cells].mean(0)
        outside = genes_of_type[~cells].mean(0) if (~cells).any() else np.zeros(len(top))
        expected = float(np.maximum(reference_change[called], 0).sum())
        marker_score[c] = float((reference_change[called] - (inside - outside)).sum()) / max(expected, 1e-6)
    return {"profile by cluster": profile, "markers by cluster": marker_score[assigned]}, assigned


def bank_of(reference: Path, label: str, cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the reference drawn per class as scnym draws its bank (at most ``cells``) and their labels."""
    import anndata as ad

    from scnym_cli.train.novelty import bank_rows

    labels = ad.read_h5ad(reference, backed="r").obs[label].astype(str).to_numpy()
    codes = np.unique(labels, return_inverse=True)[1]
    rows = bank_rows(codes, np.arange(len(labels)), seed, cells)
    return rows, labels[rows]


# how the benchmark predicts: the novelty's Unknown threshold at RATE is read from the summary
PREDICT_FLAGS = ["--write_h5ad", "false", "--write_logits", "true", "--write_embedding", "true",
                 "--unknown_rate", str(RATE)]


def predict_outputs(model: Path, data: Path, out: Path, threads: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray,
                                                                              dict]:
    """(predictions table, logits, embedding, prediction summary) of ``data``, predicted once and kept in ``out``
    (again when prediction's defaults, its flags or the model change)."""
    stamp = {"defaults": defaults_fingerprint("predict_cell_types"), "flags": PREDICT_FLAGS,
             "model": (model / "all_data" / "model.json").stat().st_mtime}
    marker = out.parent / f"{out.name}.json"
    if not ((out / "predictions.csv").exists() and marker.exists() and json.loads(marker.read_text()) == stamp):
        run([*scnym_command(), "predict_cell_types", "--model_path", str(model), "--input_counts", str(data),
             "--out_path", str(out), "--overwrite", "true", *PREDICT_FLAGS, "--quiet", "--num_threads", str(threads)],
            out / "predict.log", True)
        write_json(marker, stamp)
    table = pd.read_csv(out / "predictions.csv")
    logits = pd.read_csv(out / "logits.csv").iloc[:, 1:].to_numpy(np.float32)
    embedding = pd.read_csv(out / "embedding.csv").iloc[:, 1:].to_numpy(np.float32)
    return table, logits, embedding, json.loads((out / "prediction_summary.json").read_text())


@dataclass
class ScoredRun:
    """One model's scores of the query's cells (higher = more novel) and what they are scored against."""

    cell_ids: np.ndarray
    truth: np.ndarray
    known: np.ndarray                   # cells of types the model knows
    scores: dict[str, np.ndarray]
    probabilities: np.ndarray           # calibrated, over the model's classes
    unknown_above: dict[str, float]     # each CALLED score's value above which a cell is Unknown at RATE
    clusters: np.ndarray                # each cell's query cluster (the cluster scores')


def score_run(model: Path, reference: Path, query: Path, label: str, out: Path, threads: int) -> ScoredRun:
    """Every candidate score of the query's cells by one model."""
    import anndata as ad

    from scnym_cli.train.novelty import NoveltyReference

    table, logits, embedding, summary = predict_outputs(model, query, out / "query", threads)
    _, _, reference_embedding, _ = predict_outputs(model, reference, out / "reference", threads)
    rows, bank_labels = bank_of(reference, label, BANK_CELLS)
    cell_ids = table["cell_id"].astype(str).to_numpy()
    truth = ad.read_h5ad(query, backed="r").obs[label].astype(str).reindex(cell_ids).to_numpy()
    probability_columns = table.filter(like="prob_")
    classes = [c[len("prob_"):] for c in probability_columns.columns]
    # the model's calls (the predicted label, but for Unknown)
    called = np.asarray(classes)[probability_columns.to_numpy().argmax(axis=1)]
    scores = novelty_scores(logits, table["confidence"].to_numpy(), embedding, reference_embedding[rows],
                            bank_labels)
    by_cluster, clusters = cluster_scores(model, reference, query, label, pd.Index(cell_ids), called)
    scores["knn by cluster"] = pd.Series(scores["knn"]).groupby(clusters).transform("mean").to_numpy()
    scores["mixing by cluster"] = mixing_by_cluster(embedding, reference_embedding[rows], clusters)
    scores["novelty"] = table["novelty"].to_numpy()
    scores.update(by_cluster)
    scores["knn + markers"] = _ranks(scores["knn by cluster"]) + _ranks(scores["markers by cluster"])
    scores["knn + profile"] = _ranks(scores["knn by cluster"]) + _ranks(scores["profile by cluster"])
    distance = NoveltyReference.load(model / "all_data").threshold(RATE)
    return ScoredRun(cell_ids, truth, np.isin(truth, classes), scores, probability_columns.to_numpy(),
                     {"knn": distance, "knn by cluster": distance, "novelty": summary["novelty"]["unknown_above"]},
                     clusters)


def _ranks(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank().to_numpy()


def type_rows(truth: np.ndarray, known: np.ndarray, scores: dict[str, np.ndarray], novel: list[str],
              unknown_above: Optional[dict[str, float]] = None) -> list[dict]:
    """AUROC of every score for each of the ``novel`` types against the cells of types the model knows (and, with
    a threshold, the shares of known and novel cells called Unknown by the CALLED scores)."""
    from sklearn.metrics import roc_auc_score

    results = []
    for kind in novel:
        cells = truth == kind
        if not cells.any():
            continue
        keep = cells | known
        row = {"novel_type": kind, "n_novel": int(cells.sum()), "n_known": int(known.sum()),
               **{name: float(roc_auc_score(cells[keep], values[keep])) for name, values in scores.items()}}
        for name, threshold in (unknown_above or {}).items():
            row[f"{name}: known Unknown"] = float(np.mean(scores[name][known] > threshold))
            row[f"{name}: novel Unknown"] = float(np.mean(scores[name][cells] > threshold))
        results.append(row)
    return results


def together(runs: list[ScoredRun]) -> dict[str, np.ndarray]:
    """The scores of the runs' models together (ENSEMBLE_SCORES)."""
    n = len(runs)
    for other in runs[1:]:
        if not np.array_equal(other.cell_ids, runs[0].cell_ids):
            raise ValueError("the seeds' predictions list other cells")
    probabilities = np.mean([r.probabilities for r in runs], axis=0)
    calls = probabilities.argmax(axis=1)
    disagreement = np.mean([r.probabilities.argmax(axis=1) != calls for r in runs], axis=0)
    by_cluster = pd.Series(disagreement).groupby(runs[0].clusters).transform("mean").to_numpy()
    names = [name.format(n=n) for name in ENSEMBLE_SCORES]
    return {names[0]: np.mean([r.scores["novelty"] for r in runs], axis=0),
            names[1]: np.mean([r.scores["knn by cluster"] for r in runs], axis=0),
            names[2]: 1 - probabilities.max(axis=1), names[3]: by_cluster}


def without_class(reference: Path, label: str, kind: str, path: Path) -> Path:
    import anndata as ad

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        adata = ad.read_h5ad(reference)
        adata[adata.obs[label].astype(str).to_numpy() != kind].copy().write_h5ad(path)
    return path


def held_out_types(reference: Path, query: Path, label: str, min_cells: int) -> tuple[list[str], list[str]]:
    """(query types the reference has with at least ``min_cells`` query cells, query types it lacks)."""
    import anndata as ad

    ref_types = set(ad.read_h5ad(reference, backed="r").obs[label].astype(str))
    sizes = ad.read_h5ad(query, backed="r").obs[label].astype(str).value_counts()
    shared = [t for t, n in sizes.items() if t in ref_types and n >= min_cells]
    absent = [t for t, n in sizes.items() if t not in ref_types and n >= min_cells]
    return shared, absent


def split_rows(split_name: str, args) -> tuple[list[dict], list[dict]]:
    """(a row per type and seed, a row per type of the seeds' models together)."""
    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=200 if args.quick else None)
    shared, absent = held_out_types(reference, query, split.label, args.min_cells)
    base = args.work / "novelty" / split_name
    rows: list[dict] = []
    ensemble_rows: list[dict] = []
    jobs = [(None, reference)] if absent else []
    jobs += [(kind, without_class(reference, split.label, kind,
                                  base / "data" / f"reference_without_{_safe(kind)}.h5ad")) for kind in shared]
    for kind, training_reference in jobs:
        novel = absent if kind is None else [kind]
        protocol = {"split": split_name, "protocol": "absent from the data" if kind is None else "left out"}
        runs = []
        for seed in args.seeds:
            run_dir = base / ("natural" if kind is None else f"without_{_safe(kind)}") / f"seed{seed}"
            train_model(training_reference, query, split.label, run_dir, seed, args)
            if args.train_only:
                continue
            scored = score_run(run_dir / "model", training_reference, query, split.label, run_dir, args.num_threads)
            runs.append(scored)
            for row in type_rows(scored.truth, scored.known, scored.scores, novel, scored.unknown_above):
                rows.append({**protocol, "seed": seed, **row})
                print(f"{split_name:30s} {row['novel_type']:24s} seed {seed} "
                      + " ".join(f"{s} {row[s]:.3f}" for s in SCORES), flush=True)
        if len(runs) > 1:
            for row in type_rows(runs[0].truth, runs[0].known, together(runs), novel):
                ensemble_rows.append({**protocol, **row})
    return rows, ensemble_rows


def train_model(reference: Path, query: Path, label: str, run_dir: Path, seed: int, args) -> None:
    """The default semi-supervised model of ``reference`` (the query as target data) in run_dir/model, trained
    unless run_dir holds one of the same command under today's training defaults."""
    train = [*scnym_command(), "train_tissue_independent", "--input_counts", str(reference), "--lower_group", label,
             "--out_path", str(run_dir / "model"), "--n_folds", "0", "--seed", str(seed), "--overwrite", "true",
             "--quiet", "--unlabeled_counts", str(query), "--num_threads", str(args.num_threads)]
    genes = shared_genes_file(reference, query)
    if genes is not None:
        train += ["--genes_to_use", str(genes)]
    if args.quick:
        train += QUICK_FLAGS
    stamp = {"command": shlex.join(train), "defaults": defaults_fingerprint(), **MODEL_FILES}
    if not ((run_dir / "stamp.json").exists() and json.loads((run_dir / "stamp.json").read_text()) == stamp):
        for stale in ("query", "reference"):
            (run_dir / stale / "predictions.csv").unlink(missing_ok=True)
        run(train, run_dir / "train.log", True)
        write_json(run_dir / "stamp.json", stamp)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def recall_when_present(seeds: list[int]) -> dict[tuple[str, str], float]:
    """(split, type) -> the default's recall of the type on the query when the reference has it (mean over the
    seeds' runs of bench/accuracy.py, bench/results/accuracy.json; none there: no entry)."""
    path = RESULTS / "accuracy.json"
    if not path.exists():
        return {}
    recalls: dict[tuple[str, str], list[float]] = {}
    for row in json.loads(path.read_text())["rows"]:
        if row.get("method") == "semi_supervised" and row.get("seed") in seeds:
            for kind, value in (row.get("per_class_recall") or {}).items():
                recalls.setdefault((row["split"], kind), []).append(float(value))
    return {key: float(np.mean(values)) for key, values in recalls.items()}


def by_type(frame: pd.DataFrame, ensemble: pd.DataFrame, recall: dict) -> pd.DataFrame:
    """A row per scored type: each score's mean over seeds, the default's lowest and highest, the seeds' models
    together, and the type's recall when the reference has it."""
    keys = ["split", "novel_type", "protocol"]
    types = frame.groupby(keys, sort=False)[["n_novel", *SCORES, *[c for c in frame if "Unknown" in c]]].mean()
    spread = frame.groupby(keys, sort=False)["novelty"].agg(["min", "max"])
    types["novelty: lowest"], types["novelty: highest"] = spread["min"], spread["max"]
    if len(ensemble):
        types = types.join(ensemble.set_index(keys).drop(columns=["n_novel", "n_known"]))
    types = types.reset_index()
    # (a type the reference lacks has no recall to speak of)
    types["recall when present"] = [recall.get((r.split, r.novel_type), np.nan) if r.protocol == "left out"
                                    else np.nan for r in types.itertuples()]
    return types


def report(types: pd.DataFrame, seeds: list[int], command: str) -> list[str]:
    together_scores = [c for c in types.columns if c.endswith(" models")]
    lines = ["# Novelty scores: cells of types the reference lacks", "", *provenance(command, machine()), "",
             "AUROC of each score for the cells of a type the model was not trained on against the cells of "
             "types it knows (default semi-supervised model, the query as target data). *left out*: the type "
             "was removed from the reference; *absent*: the reference never had it. Each type's AUROC is the mean "
             f"over the models of seeds {', '.join(map(str, seeds))}"
             + (f"; *{len(seeds)} models*: the seeds' models together" if together_scores else "")
             + ". See the script's docstring.", "",
             "| score | mean AUROC | worst | types below 0.85 |", "|---|---|---|---|"]
    for score in [*SCORES, *together_scores]:
        worst = types.loc[types[score].idxmin()]
        lines.append(f"| {score} | {types[score].mean():.3f} | {worst[score]:.3f} ({worst['split']}: "
                     f"{worst['novel_type']}) | {int((types[score] < 0.85).sum())} of {len(types)} |")
    recognized = types[types["recall when present"] >= RECOGNIZED_RECALL]
    if len(recognized):
        best = max([*SCORES, *together_scores], key=lambda c: recognized[c].mean())
        lines += ["", f"Types the default classifies with recall >= {RECOGNIZED_RECALL} when the reference has them "
                  f"(bench/results/accuracy.json, same seeds): {len(recognized)} of {len(types)}; on them `novelty` "
                  f"{recognized['novelty'].mean():.3f} ({int((recognized['novelty'] < 0.85).sum())}"
                  f" below 0.85), the best score `{best}` {recognized[best].mean():.3f} "
                  f"({int((recognized[best] < 0.85).sum())} below 0.85). A type the classifier cannot tell from its "
                  "neighbours when it has learned it is not one a novelty score can find when it has not."]
    lines += ["", f"Unknown calls at `--unknown_rate {RATE}` (the threshold set on the model-selection cells: their "
              "own knn for `knn` and `knn by cluster`, their own novelty against the query for `novelty`, as scnym "
              "calls them): the share of the known query cells and of the novel type's cells called Unknown, mean "
              "over types.", "", "| score | known cells Unknown | novel cells Unknown |", "|---|---|---|"]
    for name in CALLED:
        lines.append(f"| {name} | {types[f'{name}: known Unknown'].mean():.3f} | "
                     f"{types[f'{name}: novel Unknown'].mean():.3f} |")
    columns = [*SCORES, "novelty: lowest", "novelty: highest", *together_scores]
    lines += ["", "Per type (mean over seeds; *lowest*, *highest*: of `novelty` over the seeds' models; "
              "*recall*: when the reference has the type).", "",
              "| split | type | protocol | novel cells | " + " | ".join(columns) + " | recall |",
              "|---" * (5 + len(columns)) + "|"]
    for _, r in types.iterrows():
        recall = "" if np.isnan(r["recall when present"]) else f"{r['recall when present']:.2f}"
        lines.append(f"| {SPLITS[r['split']].description} | {r['novel_type']} | {r['protocol']} | "
                     f"{int(r['n_novel'])} | "
                     + " | ".join(f"{r[s]:.3f}" for s in columns) + f" | {recall} |")
    return lines


def main(argv=None) -> pd.DataFrame:
    """The per-type table (empty with --train_only)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--min_cells", type=int, default=10, help="query cells a type needs to be scored")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="novelty")
    parser.add_argument("--train_only", action="store_true", help="train the models, score and write nothing")
    parser.add_argument("--quick", action="store_true", help="tiny subsample and 2 epochs (the test suite)")
    args = parser.parse_args(argv)
    command = "python bench/novelty.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows, ensemble_rows = [], []
    for split in args.splits:
        mine, together_rows = split_rows(split, args)
        rows += mine
        ensemble_rows += together_rows
    if args.train_only:
        return pd.DataFrame()
    frame, ensemble = pd.DataFrame(rows), pd.DataFrame(ensemble_rows)
    types = by_type(frame, ensemble, {} if args.quick else recall_when_present(args.seeds))
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": machine(), "seeds": args.seeds,
                                               "rows": frame.to_dict(orient="records"),
                                               "together": ensemble.to_dict(orient="records"),
                                               "types": types.to_dict(orient="records")})
    write_markdown(args.out / f"{args.tag}.md", report(types, args.seeds, command))
    return types


if __name__ == "__main__":
    main()
