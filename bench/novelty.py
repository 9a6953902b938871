"""Novelty scores, leave one class out (issue 11): which score tells cells of a type the reference lacks?

For every split and every query type with at least ``--min_cells`` query cells that the reference has,
that type is removed from the reference; the default semi-supervised model is trained on the rest (the
whole query as target data, as a user would) and predicts the query. Each candidate score then ranks the
removed type's query cells against the cells of types the model knows (AUROC; 1 = every novel cell scored
above every known one). Types the reference lacks to begin with (neutrophils across species, dendritic
and CD34+ cells in pbmc68k) are scored the same way from the default runs of bench/accuracy.py.

Scores, each higher = more novel:
* ``1 - confidence``: one minus the calibrated top probability (what --unknown_threshold uses);
* ``energy``: -logsumexp(logits) (Liu et al. 2020);
* ``knn``: mean cosine distance to the 10 nearest reference cells in the embedding (the cell's own);
* ``prototype``: cosine distance to the nearest class centroid of the reference in the embedding;
* ``knn by cluster``: scnym's ``novelty`` column: ``knn`` averaged over the cell's cluster of query cells
  (16 k-means clusters in the query's own gene space, scnym_cli.train.novelty.QueryClusters);
* ``profile by cluster``: 1 - the highest correlation of the cluster's mean expression with a reference
  type's (each gene standardized within its own dataset), over the model's genes;
* ``knn + profile``: the sum of the two clusters' ranks among the query's cells (no absolute scale: no
  threshold can be set from the reference for it);
* ``markers by cluster``: the share of the reference's marker fold change (the type the model calls most of
  the cluster's cells: its 20 genes most above every other reference type) that the cluster lacks against
  the rest of the query;
* ``knn + markers``: the sum of the ranks of ``knn by cluster`` and ``markers by cluster``.
The reference embeddings are those of the training reference (at most 2,000 cells, drawn per class as scnym
draws the bank it keeps with a model). For the two scores that ``--unknown_rate`` could use (``knn``, the
default before query clusters, and ``knn by cluster``, the default now), the share of known and of novel
cells called Unknown at ``--unknown_rate 0.05`` is reported too.

    python bench/novelty.py --num_threads 1

Writes bench/results/novelty.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import QUICK_FLAGS, defaults_fingerprint, run  # noqa: E402
from common import (RESULTS, SPLITS, WORK, machine, materialize, provenance, scnym_command,  # noqa: E402
                    shared_genes_file, write_json, write_markdown)
from scnym_cli.train.novelty import BANK_CELLS, K_NEAREST as K  # noqa: E402

SCORES = ["1 - confidence", "energy", "knn", "prototype", "knn by cluster", "profile by cluster", "knn + profile",
          "markers by cluster", "knn + markers"]
# the scores with a threshold from the reference's held-out cells: (score, the cell-level score thresholded)
CALLED = {"knn": "knn", "knn by cluster": "knn"}
RATE = 0.05


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


def cluster_scores(model: Path, reference: Path, query: Path, label: str, cell_ids: pd.Index,
                   predicted: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Scores of each query cell's cluster (16 k-means clusters of the query in its own gene space, as scnym's),
    over the model's genes:

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
    return {"profile by cluster": profile, "markers by cluster": marker_score[assigned]}


def bank_of(reference: Path, label: str, cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the reference drawn per class as scnym draws its bank (at most ``cells``) and their labels."""
    import anndata as ad

    from scnym_cli.train.novelty import bank_rows

    labels = ad.read_h5ad(reference, backed="r").obs[label].astype(str).to_numpy()
    codes = np.unique(labels, return_inverse=True)[1]
    rows = bank_rows(codes, np.arange(len(labels)), seed, cells)
    return rows, labels[rows]


def predict_outputs(model: Path, data: Path, out: Path, threads: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(predictions table, logits, embedding) of ``data``, predicted once and kept in ``out`` (again when
    prediction's defaults change)."""
    stamp = {"defaults": defaults_fingerprint("predict_cell_types")}
    marker = out.parent / f"{out.name}.json"
    if not ((out / "predictions.csv").exists() and marker.exists() and json.loads(marker.read_text()) == stamp):
        run([*scnym_command(), "predict_cell_types", "--model_path", str(model), "--input_counts", str(data),
             "--out_path", str(out), "--overwrite", "true", "--write_h5ad", "false", "--write_logits", "true",
             "--write_embedding", "true", "--quiet", "--num_threads", str(threads)], out / "predict.log", True)
        write_json(marker, stamp)
    table = pd.read_csv(out / "predictions.csv")
    logits = pd.read_csv(out / "logits.csv").iloc[:, 1:].to_numpy(np.float32)
    embedding = pd.read_csv(out / "embedding.csv").iloc[:, 1:].to_numpy(np.float32)
    return table, logits, embedding


def score_run(model: Path, reference: Path, query: Path, label: str, novel: list[str], out: Path,
              threads: int) -> list[dict]:
    """AUROC of every score for each of the ``novel`` types against the cells of types the model knows."""
    import anndata as ad
    from sklearn.metrics import roc_auc_score

    from scnym_cli.train.novelty import NoveltyReference

    table, logits, embedding = predict_outputs(model, query, out / "query", threads)
    _, _, reference_embedding = predict_outputs(model, reference, out / "reference", threads)
    rows, bank_labels = bank_of(reference, label, BANK_CELLS)
    truth = ad.read_h5ad(query, backed="r").obs[label].astype(str).reindex(table["cell_id"].astype(str)).to_numpy()
    classes = [c[len("prob_"):] for c in table.filter(like="prob_").columns]
    scores = novelty_scores(logits, table["confidence"].to_numpy(), embedding, reference_embedding[rows],
                            bank_labels)
    scores["knn by cluster"] = table["novelty"].to_numpy()
    scores.update(cluster_scores(model, reference, query, label, pd.Index(table["cell_id"].astype(str)),
                                 table["predicted_label"].astype(str).to_numpy()))
    scores["knn + markers"] = (pd.Series(scores["knn by cluster"]).rank().to_numpy()
                               + pd.Series(scores["markers by cluster"]).rank().to_numpy())
    scores["knn + profile"] = (pd.Series(scores["knn by cluster"]).rank().to_numpy()
                               + pd.Series(scores["profile by cluster"]).rank().to_numpy())
    threshold = NoveltyReference.load(model / "all_data").threshold(RATE)
    known = np.isin(truth, classes)
    results = []
    for kind in novel:
        cells = truth == kind
        if not cells.any():
            continue
        keep = cells | known
        row = {"novel_type": kind, "n_novel": int(cells.sum()), "n_known": int(known.sum()),
               **{name: float(roc_auc_score(cells[keep], values[keep])) for name, values in scores.items()}}
        for name in CALLED:
            row[f"{name}: known Unknown"] = float(np.mean(scores[name][known] > threshold))
            row[f"{name}: novel Unknown"] = float(np.mean(scores[name][cells] > threshold))
        results.append(row)
    return results


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


def split_rows(split_name: str, args) -> list[dict]:
    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=200 if args.quick else None)
    shared, absent = held_out_types(reference, query, split.label, args.min_cells)
    base = args.work / "novelty" / split_name
    rows = []
    jobs = [(None, reference)] if absent else []
    jobs += [(kind, without_class(reference, split.label, kind,
                                                       base / "data" / f"reference_without_{_safe(kind)}.h5ad"))
                                  for kind in shared]
    for kind, training_reference in jobs:
        run_dir = base / ("natural" if kind is None else f"without_{_safe(kind)}") / f"seed{args.seed}"
        train = [*scnym_command(), "train_tissue_independent", "--input_counts", str(training_reference),
                 "--lower_group", split.label, "--out_path", str(run_dir / "model"), "--n_folds", "0", "--seed",
                 str(args.seed), "--overwrite", "true", "--quiet", "--unlabeled_counts", str(query),
                 "--num_threads", str(args.num_threads)]
        genes = shared_genes_file(training_reference, query)
        if genes is not None:
            train += ["--genes_to_use", str(genes)]
        if args.quick:
            train += QUICK_FLAGS
        stamp = {"command": shlex.join(train), "defaults": defaults_fingerprint()}
        if not ((run_dir / "stamp.json").exists() and json.loads((run_dir / "stamp.json").read_text()) == stamp):
            for stale in ("query", "reference"):
                (run_dir / stale / "predictions.csv").unlink(missing_ok=True)
            run(train, run_dir / "train.log", True)
            write_json(run_dir / "stamp.json", stamp)
        novel = absent if kind is None else [kind]
        for row in score_run(run_dir / "model", training_reference, query, split.label, novel, run_dir,
                             args.num_threads):
            row = {"split": split_name, "protocol": "absent from the data" if kind is None else "left out", **row}
            rows.append(row)
            print(f"{split_name:30s} {row['novel_type']:24s} " + " ".join(f"{s} {row[s]:.3f}" for s in SCORES),
                  flush=True)
    return rows


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def report(frame: pd.DataFrame, command: str) -> list[str]:
    lines = ["# Novelty scores: cells of types the reference lacks", "", *provenance(command, machine()), "",
             "AUROC of each score for the cells of a type the model was not trained on against the cells of "
             "types it knows (default semi-supervised model, the query as target data). *left out*: the type "
             "was removed from the reference; *absent*: the reference never had it. See the script's docstring.",
             "", "| score | mean AUROC | worst | types below 0.85 |", "|---|---|---|---|"]
    for score in SCORES:
        worst = frame.loc[frame[score].idxmin()]
        lines.append(f"| {score} | {frame[score].mean():.3f} | {worst[score]:.3f} ({worst['split']}: "
                     f"{worst['novel_type']}) | {int((frame[score] < 0.85).sum())} of {len(frame)} |")
    lines += ["", f"Unknown calls at `--unknown_rate {RATE}` (the threshold set on the reference's model-selection "
              "cells' own knn): the share of the known query cells and of the novel type's cells called Unknown, "
              "mean over types.", "", "| score | known cells Unknown | novel cells Unknown |", "|---|---|---|"]
    for name in CALLED:
        lines.append(f"| {name} | {frame[f'{name}: known Unknown'].mean():.3f} | "
                     f"{frame[f'{name}: novel Unknown'].mean():.3f} |")
    lines += ["", "| split | type | protocol | novel cells | " + " | ".join(SCORES) + " |",
              "|---" * (4 + len(SCORES)) + "|"]
    for _, r in frame.iterrows():
        lines.append(f"| {SPLITS[r['split']].description} | {r['novel_type']} | {r['protocol']} | {r['n_novel']} | "
                     + " | ".join(f"{r[s]:.3f}" for s in SCORES) + " |")
    return lines


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_cells", type=int, default=10, help="query cells a type needs to be scored")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="novelty")
    parser.add_argument("--quick", action="store_true", help="tiny subsample and 2 epochs (the test suite)")
    args = parser.parse_args(argv)
    command = "python bench/novelty.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    frame = pd.DataFrame([row for split in args.splits for row in split_rows(split, args)])
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": machine(),
                                               "rows": frame.to_dict(orient="records")})
    write_markdown(args.out / f"{args.tag}.md", report(frame, command))
    return frame


if __name__ == "__main__":
    main()
