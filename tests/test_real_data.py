"""Integration tests on the real datasets in ../shared/data (skipped when absent; under CI=true a
missing file fails the run)."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scnym_cli.config import Config
from scnym_cli.workflows.inputs import load_cells

from conftest import assert_one_line_error, invoke, shared_data

pytestmark = pytest.mark.real_data

KANG = "kang2018_ctrl_8donors.h5ad"
REFERENCE_DONORS = ["1015", "1256", "1488", "1244"]


@pytest.fixture(scope="module")
def kang_split(tmp_path_factory):
    full = ad.read_h5ad(shared_data(KANG))
    directory = tmp_path_factory.mktemp("kang")
    is_reference = full.obs["sample_id"].astype(str).isin(REFERENCE_DONORS).to_numpy()
    full[is_reference].copy().write_h5ad(directory / "reference.h5ad")
    full[~is_reference].copy().write_h5ad(directory / "query.h5ad")
    return directory


@pytest.fixture(scope="module")
def kang_model(kang_split):
    from typer.testing import CliRunner

    from scnym_cli.cli import app

    result = CliRunner().invoke(app, [
        "train_tissue_independent", "--input_counts", str(kang_split / "reference.h5ad"),
        "--lower_group", "cluster_id", "--out_path", str(kang_split / "model"), "--n_folds", "0",
        "--n_epochs", "20", "--min_epochs", "5"])
    assert result.exit_code == 0, result.output
    return kang_split / "model"


def test_kang_cross_donor_transfer(runner, kang_split, kang_model):
    """A short (20-epoch) supervised run already transfers across donors; the full default run's
    figures are in bench/results (README, Benchmarks)."""
    result = invoke(runner, "predict_cell_types", "--model_path", kang_model, "--input_counts",
                    kang_split / "query.h5ad", "--lower_group", "cluster_id", "--out_path", kang_split / "pred")
    assert result.exit_code == 0, result.output
    metrics = json.loads((kang_split / "pred" / "prediction_summary.json").read_text())["metrics_vs_cluster_id"]
    assert metrics["accuracy"] >= 0.88 and metrics["balanced_accuracy"] >= 0.77, metrics
    annotated = ad.read_h5ad(kang_split / "pred" / "annotated.h5ad")
    assert annotated.n_obs == 3506 and annotated.obsm["X_scnym"].shape == (3506, 256)


def test_symbols_vs_ensembl_ids_is_a_clear_error(runner, kang_model, tmp_path):
    cellbench = shared_data("cellbench_celseq2_dropseq.h5ad")
    result = invoke(runner, "predict_cell_types", "--model_path", kang_model, "--input_counts", cellbench,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "model genes", "ENSG", "symbols vs Ensembl")
    assert not (tmp_path / "p").exists()


def test_ensembl_gene_column_makes_the_same_data_comparable(runner, kang_split, tmp_path):
    """Trained on Kang's Ensembl ids (--gene_column), a model reads CellBench's Ensembl-named genes."""
    result = invoke(runner, "train_tissue_independent", "--input_counts", kang_split / "reference.h5ad",
                    "--gene_column", "ensembl", "--lower_group", "cluster_id", "--out_path", tmp_path / "m",
                    "--n_folds", "0", "--n_epochs", "2", "--min_epochs", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "all_data" / "model.json").read_text())["genes"][0].startswith("ENSG")
    result = invoke(runner, "predict_cell_types", "--model_path", tmp_path / "m", "--input_counts",
                    shared_data("cellbench_celseq2_dropseq.h5ad"), "--out_path", tmp_path / "p")
    assert result.exit_code == 0, result.output
    overlap = json.loads((tmp_path / "p" / "gene_overlap.json").read_text())
    assert overlap["fraction_found"] > 0.9 and overlap["n_extra"] > 15000


def test_log2_logcounts_layer_equals_raw_counts():
    """muscat/scater logcounts are log2(counts / size factor + 1): detected and brought to the same CPM."""
    path = shared_data("kang2018_ctrl_stim_small.h5ad")
    from_counts, kind_counts = load_cells(Config(), path)
    from_log2, kind_log = load_cells(Config(input_layer="logcounts"), path)
    assert (kind_counts, kind_log) == ("counts", "log2_1p")
    np.testing.assert_allclose(from_log2.X.toarray(), from_counts.X.toarray(), rtol=1e-3, atol=1e-3)


def test_chemistry_transfer_on_log_normalized_input(runner, tmp_path):
    """pbmc_3chemistries holds ln(CP10k+1) of a gene subset: accepted as log-normalized and transferred."""
    full = ad.read_h5ad(shared_data("pbmc_3chemistries_small.h5ad"))
    held_out = (full.obs["donor"] == "3pv1").to_numpy()
    full[~held_out].copy().write_h5ad(tmp_path / "ref.h5ad")
    full[held_out].copy().write_h5ad(tmp_path / "query.h5ad")
    result = invoke(runner, "train_tissue_independent", "--input_counts", tmp_path / "ref.h5ad",
                    "--lower_group", "cell_type_broad", "--out_path", tmp_path / "m", "--n_folds", "0",
                    "--n_epochs", "30", "--min_epochs", "5", "--batch_size", "128")
    assert result.exit_code == 0, result.output
    result = invoke(runner, "predict_cell_types", "--model_path", tmp_path / "m", "--input_counts",
                    tmp_path / "query.h5ad", "--lower_group", "cell_type_broad", "--out_path", tmp_path / "p")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "p" / "prediction_summary.json").read_text())
    assert summary["input_normalization"] == "log1p"
    assert summary["metrics_vs_cell_type_broad"]["accuracy"] >= 0.85, summary


KNOWN_MARKERS = {
    "B cells": {"CD79A"},
    "CD14+ Monocytes": {"LYZ", "S100A8", "S100A9", "CD14"},
    "NK cells": {"GNLY", "NKG7", "GZMB"},
    "FCGR3A+ Monocytes": {"FCGR3A", "MS4A7"},
}


def test_expected_gradients_find_known_pbmc_markers(runner, kang_split, kang_model):
    """Kang control PBMCs: each class's top 20 (of 1,287 genes) holds a textbook marker."""
    out = kang_split / "markers"
    result = invoke(runner, "find_cell_type_markers", "--model_path", kang_model, "--input_counts",
                    kang_split / "reference.h5ad", "--lower_group", "cluster_id", "--out_path", out,
                    "--marker_methods", "expected_gradients", "--marker_classes", ",".join(KNOWN_MARKERS),
                    "--eg_max_cells", "200", "--eg_samples", "32")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "expected_gradients_markers.csv")
    for name, markers in KNOWN_MARKERS.items():
        top = set(table[(table["class"] == name) & (table["rank"] <= 20)]["gene"])
        assert top & markers, (name, sorted(top))
