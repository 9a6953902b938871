"""AnnData zarr stores are read wherever an h5ad is (training in memory and --backed, streaming prediction,
shards) and give the same results; a zarr query gets an annotated.zarr copy."""

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_h5ad

pytest.importorskip("zarr", reason="zarr is a dependency of scnym (pyproject.toml)")


def _stores(tmp_path, adata, name, zarr_format=3):
    h5ad = write_h5ad(adata, tmp_path / f"{name}.h5ad")
    zarr_path = tmp_path / f"{name}.zarr"
    with ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(zarr_path)
    return h5ad, zarr_path


def _weights(run):
    return load_file(run / "all_data" / "00_best_model_weights.safetensors")


@pytest.mark.parametrize("backed", ["false", "true"])
def test_training_from_zarr_equals_training_from_h5ad(runner, tmp_path, backed):
    h5ad, zarr_path = _stores(tmp_path, make_counts(n_cells=150), "ref")
    runs = {}
    for name, data in (("h5ad", h5ad), ("zarr", zarr_path)):
        result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                        "--out_path", tmp_path / name, *FAST_FLAGS, "--n_folds", "0", "--backed", backed)
        assert result.exit_code == 0, result.output
        runs[name] = _weights(tmp_path / name)
    for key, value in runs["h5ad"].items():
        assert np.array_equal(value, runs["zarr"][key]), key


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_prediction_from_zarr_equals_h5ad_and_writes_an_annotated_zarr(runner, trained_run, tmp_path, zarr_format):
    query = make_counts(n_cells=90, seed=5)
    h5ad, zarr_path = _stores(tmp_path, query, "q", zarr_format)
    for name, data in (("h5ad", h5ad), ("zarr", zarr_path)):
        result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                        "--out_path", tmp_path / f"p_{name}", "--prediction_chunk_size", "40")
        assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p_h5ad" / "predictions.csv"),
                                  pd.read_csv(tmp_path / "p_zarr" / "predictions.csv"), check_exact=True)
    assert not (tmp_path / "p_zarr" / "annotated.h5ad").exists()
    from_zarr = ad.read_zarr(tmp_path / "p_zarr" / "annotated.zarr")
    from_h5ad = ad.read_h5ad(tmp_path / "p_h5ad" / "annotated.h5ad")
    assert (from_zarr.obs["scNym"].astype(str) == from_h5ad.obs["scNym"].astype(str)).all()
    np.testing.assert_array_equal(from_zarr.obsm["X_scnym"], from_h5ad.obsm["X_scnym"])
    np.testing.assert_array_equal(from_zarr.obsm["scNym_probabilities"], from_h5ad.obsm["scNym_probabilities"])
    assert from_zarr.uns["scNym"]["models"].keys() == from_h5ad.uns["scNym"]["models"].keys()
    assert (from_zarr.X != query.X).nnz == 0                      # the data themselves are untouched
    assert ad.read_zarr(zarr_path).obs.columns.tolist() == query.obs.columns.tolist()   # the input too


def test_a_folder_of_zarr_shards_is_one_query(runner, trained_run, tmp_path):
    query = make_counts(n_cells=90, seed=6)
    shards = tmp_path / "shards"
    shards.mkdir()
    with ad.settings.override(zarr_write_format=3):
        query[:50].copy().write_zarr(shards / "a.zarr")
        query[50:].copy().write_zarr(shards / "b.zarr")
    whole = write_h5ad(query, tmp_path / "q.h5ad")
    for name, data in (("shards", shards), ("whole", whole)):
        assert invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                      "--out_path", tmp_path / name).exit_code == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "shards" / "predictions.csv"),
                                  pd.read_csv(tmp_path / "whole" / "predictions.csv"), check_exact=True)


def test_a_damaged_zarr_store_is_a_clear_error(runner, trained_run, tmp_path):
    _, zarr_path = _stores(tmp_path, make_counts(n_cells=60), "q")
    shutil.rmtree(zarr_path / "obs")
    for command in (("predict_cell_types", "--model_path", trained_run),
                    ("train_tissue_independent", "--lower_group", "cell_type")):
        result = invoke(runner, *command, "--input_counts", zarr_path, "--out_path", tmp_path / "out")
        assert_one_line_error(result, str(zarr_path), "zarr store")
