"""Which genes a model trains on: genes shared with the target, highly variable genes across datasets."""

import json

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scnym_cli.config import Config
from scnym_cli.data.gene_selection import highly_variable_genes, normalized_dispersion, rank_genes
from scnym_cli.workflows.inputs import load_training_inputs

from conftest import FAST_FLAGS, invoke, make_counts, write_h5ad


def marker_counts(seed: int = 0, n_cells: int = 300, n_genes: int = 2000, flat_markers=()) -> sp.csr_matrix:
    """Counts of 3 classes over genes of log-normal rates; genes 0-14 are 8x markers (5 per class) with
    base rates in [1, 4]; ``flat_markers`` are not markers here. Enough genes that every mean bin of the
    dispersion z-scores is well filled, as in real data."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % 3
    rate = np.exp(rng.normal(-0.5, 1.3, n_genes))
    rate[:15] = rng.uniform(1, 4, 15)
    rates = np.tile(rate, (n_cells, 1))
    for k in range(3):
        markers = [g for g in range(k * 5, (k + 1) * 5) if g not in flat_markers]
        rates[np.ix_(labels == k, markers)] *= 8
    return sp.csr_matrix(rng.poisson(rates * rng.uniform(0.5, 2, (n_cells, 1))).astype(np.float32))


def log_cpm(X) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float64)
    X = sp.csr_matrix(sp.diags(1e6 / np.asarray(X.sum(1)).ravel()) @ X)
    X.data = np.log1p(X.data)
    return X


def test_planted_markers_are_among_the_most_variable_genes():
    X = log_cpm(marker_counts(seed=0))
    chosen = highly_variable_genes([[X]], 2000, 100)
    assert set(range(15)) <= set(chosen)                          # all 15 markers in the top 5% of 2,000 genes
    assert len(chosen) == 100 and list(chosen) == sorted(chosen)
    # row blocks give the same dispersions as the whole matrix
    np.testing.assert_allclose(normalized_dispersion([X[:100], X[100:250], X[250:]], 2000),
                               normalized_dispersion([X], 2000))
    assert list(highly_variable_genes([[X]], 2000, 5000)) == list(range(2000))


def test_genes_variable_in_every_dataset_rank_first():
    reference = log_cpm(marker_counts(seed=0))
    target = log_cpm(marker_counts(seed=1, flat_markers=range(5, 15)))   # classes 1, 2 flat in the target
    order = list(rank_genes([[reference], [target]], 2000, 100))
    # markers variable in both datasets first, then those variable in the reference only
    assert max(order.index(g) for g in range(5)) < min(order.index(g) for g in range(5, 15))
    undetected = sp.csr_matrix(reference.toarray() * (np.arange(2000) != 3))
    assert normalized_dispersion([undetected], 2000)[3] == -np.inf       # never chosen


def test_training_genes_are_shared_with_the_target_then_highly_variable(runner, tmp_path):
    reference = make_counts(n_cells=240, n_genes=80, seed=0)
    target = make_counts(n_cells=120, n_genes=80, seed=1)
    target = target[:, 10:].copy()                                          # lacks genes 0-9 (markers of 2 classes)
    target.obs_names = [f"t{i}" for i in range(target.n_obs)]
    paths = write_h5ad(reference, tmp_path / "r.h5ad"), write_h5ad(target, tmp_path / "t.h5ad")
    config = Config(input_counts=paths[0], lower_group="cell_type", unlabeled_counts=paths[1])
    inputs = load_training_inputs(config)
    assert list(inputs.cells.genes) == list(reference.var_names[10:])
    assert inputs.gene_report == {"n_reference_genes": 80, "n_shared_genes": 70, "n_training_genes": 70}
    # the target's rows hold its own values, column for column
    np.testing.assert_allclose(inputs.cells.X[inputs.unlabeled_rows].toarray(), log_cpm(target.X).toarray(), rtol=1e-5)

    chosen = load_training_inputs(config.replace(n_top_genes=12))
    assert len(chosen.cells.genes) == 12 and {"gene010", "gene014"} <= set(chosen.cells.genes)
    assert chosen.gene_report["n_highly_variable_genes"] == 12
    # --variable_in reference: ranked on the reference's cells alone
    reference_rows = np.setdiff1d(np.arange(inputs.cells.X.shape[0]), inputs.unlabeled_rows)
    by_reference = highly_variable_genes([[inputs.cells.X[reference_rows]]], 70, 12)
    from_reference = load_training_inputs(config.replace(n_top_genes=12, variable_in="reference"))
    assert list(from_reference.cells.genes) == list(inputs.cells.genes[by_reference])
    every = load_training_inputs(config.replace(shared_genes=False))
    assert len(every.cells.genes) == 80                                     # the target's missing genes are 0
    backed = load_training_inputs(config.replace(n_top_genes=12, backed=True))
    assert list(backed.cells.genes) == list(chosen.cells.genes)            # the same genes read from disk

    result = invoke(runner, "train_tissue_independent", "--input_counts", paths[0], "--lower_group", "cell_type",
                    "--unlabeled_counts", paths[1], "--n_top_genes", "12", "--out_path", tmp_path / "m", *FAST_FLAGS)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "m" / "all_data" / "model.json").read_text())
    assert manifest["genes"] == list(chosen.cells.genes)
    assert manifest["training"]["gene_selection"]["n_shared_genes"] == 70


def test_genes_to_use_wins_over_n_top_genes(tmp_path):
    reference = make_counts(n_cells=120, n_genes=40, seed=0)
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(reference.var_names[20:]) + "\n")
    config = Config(input_counts=write_h5ad(reference, tmp_path / "r.h5ad"), lower_group="cell_type",
                    genes_to_use=genes, n_top_genes=5)
    assert list(load_training_inputs(config).cells.genes) == list(pd.Index(reference.var_names[20:]))
