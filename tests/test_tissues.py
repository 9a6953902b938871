"""train_tissue_dependent and train_tissue_specific: the tissue input is used, models are routed,
groups are checked."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_h5ad

FLAGS = [f for f in FAST_FLAGS]
FLAGS[FLAGS.index("--n_epochs") + 1] = "40"


def tissue_labelled(n_cells=300, seed=0):
    """Expression shows the cell family (planted markers); only the tissue tells the label's suffix."""
    adata = make_counts(n_cells=n_cells, n_classes=2, seed=seed)
    family = adata.obs["cell_type"].astype(str).str[-1]
    adata.obs["tissue"] = np.where(np.arange(n_cells) % 4 < 2, "lung", "liver")
    adata.obs["label"] = [f"family{f}_{t}" for f, t in zip(family, adata.obs["tissue"])]
    return adata


def train(runner, command, out, *args):
    result = invoke(runner, command, "--lower_group", "label", "--upper_group", "tissue", "--out_path", out,
                    *FLAGS, *args)
    assert result.exit_code == 0, result.output
    return out


def predict(runner, model, data, out, *args):
    result = invoke(runner, "predict_cell_types", "--model_path", model, "--input_counts", data, "--out_path", out,
                    *args)
    return result, (pd.read_csv(out / "predictions.csv") if result.exit_code == 0 else None)


def split_cells(n_cells=600):
    """Training cells and new cells of the same experiment (a model that memorized its training
    cells has to generalize)."""
    full = tissue_labelled(n_cells=n_cells)
    return full[: n_cells // 2].copy(), full[n_cells // 2:].copy()


def test_tissue_dependent_model_uses_the_tissue(runner, tmp_path):
    adata, query = split_cells()
    data = write_h5ad(adata, tmp_path / "x.h5ad")
    run = train(runner, "train_tissue_dependent", tmp_path / "dep", "--input_counts", data, "--n_folds", "0")
    manifest = json.loads((run / "all_data" / "model.json").read_text())
    covariates = manifest["covariates"]
    assert (covariates["column"], covariates["categories"]) == ("tissue", ["liver", "lung"])
    assert 5 < covariates["scale"] < 15    # the one-hot sits at the scale of ln(CPM+1) values
    assert manifest["model"]["kwargs"]["n_covariates"] == 2
    result, table = predict(runner, run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p")
    assert result.exit_code == 0, result.output
    accuracy = (table["predicted_label"].to_numpy() == query.obs["label"].to_numpy()).mean()
    assert accuracy > 0.85
    flipped = query.copy()
    flipped.obs["tissue"] = np.where(query.obs["tissue"] == "lung", "liver", "lung")
    _, table_flipped = predict(runner, run, write_h5ad(flipped, tmp_path / "f.h5ad"), tmp_path / "pf")
    suffix = table["predicted_label"].str.split("_").str[-1]
    suffix_flipped = table_flipped["predicted_label"].str.split("_").str[-1]
    assert (suffix != suffix_flipped).mean() > 0.85         # the tissue input drives the suffix
    family = table["predicted_label"].str.split("_").str[0]
    assert (family == table_flipped["predicted_label"].str.split("_").str[0]).mean() > 0.85


def test_tissue_independent_model_cannot_see_the_tissue(runner, tmp_path):
    adata, query = split_cells()
    data = write_h5ad(adata, tmp_path / "x.h5ad")
    run = train(runner, "train_tissue_independent", tmp_path / "ind", "--input_counts", data, "--n_folds", "0")
    _, table = predict(runner, run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p")
    assert (table["predicted_label"].to_numpy() == query.obs["label"].to_numpy()).mean() < 0.75


def test_tissue_dependent_prediction_needs_the_column_and_warns_on_unseen_groups(runner, tmp_path):
    adata = tissue_labelled()
    run = train(runner, "train_tissue_dependent", tmp_path / "dep", "--input_counts",
                write_h5ad(adata, tmp_path / "x.h5ad"), "--n_folds", "0")
    without = adata.copy()
    del without.obs["tissue"]
    result, _ = predict(runner, run, write_h5ad(without, tmp_path / "n.h5ad"), tmp_path / "p1")
    assert_one_line_error(result, "tissue-dependent", "'tissue' column")
    unseen = adata.copy()
    unseen.obs["tissue"] = ["heart" if i < 30 else t for i, t in enumerate(unseen.obs["tissue"])]
    result, table = predict(runner, run, write_h5ad(unseen, tmp_path / "u.h5ad"), tmp_path / "p2")
    assert result.exit_code == 0 and len(table) == 300
    assert "30 query cells" in result.stderr and "heart" in result.stderr


@pytest.mark.slow
def test_tissue_specific_models_and_routing(runner, tmp_path):
    adata = tissue_labelled(n_cells=300)
    adata.obs["tissue"] = adata.obs["tissue"].astype(str)
    adata.obs.iloc[:4, adata.obs.columns.get_loc("tissue")] = "heart"           # too small: skipped
    data = write_h5ad(adata, tmp_path / "x.h5ad")
    run = train(runner, "train_tissue_specific", tmp_path / "spec", "--input_counts", data)
    for tissue in ("lung", "liver"):
        directory = run / "tissues" / tissue
        assert (directory / "all_data" / "model.json").is_file() and (directory / "fold_eval_acc.csv").is_file()
        classes = json.loads((directory / "all_data" / "model.json").read_text())["classes"]
        assert all(c.endswith(tissue) for c in classes)
    summary = pd.read_csv(run / "tissues_summary.csv").set_index("group")
    assert summary.loc["heart", "status"] == "skipped" and "fewer than" in summary.loc["heart", "reason"]
    assert summary.loc["lung", "status"] == "trained" and summary.loc["lung", "cv_accuracy"] > 0.8
    routing = json.loads((run / "tissue_specific.json").read_text())
    assert routing["models"] == {"liver": "tissues/liver", "lung": "tissues/lung"}

    query = adata[adata.obs["tissue"] != "heart"].copy()
    result, table = predict(runner, run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert (table["predicted_label"].str.split("_").str[-1].to_numpy() == query.obs["tissue"].to_numpy()).all()
    probabilities = table.filter(like="prob_")
    assert probabilities.shape[1] == 4
    lung = query.obs["tissue"].to_numpy() == "lung"
    assert (probabilities.loc[lung, [c for c in probabilities if c.endswith("liver")]] == 0).all().all()
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)

    result, _ = predict(runner, run, data, tmp_path / "p2")        # the 4 heart cells have no model
    assert_one_line_error(result, "4 query cells", "'tissue' groups without a model", "heart")


@pytest.mark.parametrize("command", ["train_tissue_dependent", "train_tissue_specific"])
def test_missing_upper_group_column(runner, tmp_path, command):
    adata = tissue_labelled()
    del adata.obs["tissue"]
    result = invoke(runner, command, "--input_counts", write_h5ad(adata, tmp_path / "x.h5ad"), "--lower_group",
                    "label", "--upper_group", "tissue", "--out_path", tmp_path / "o", *FLAGS)
    assert_one_line_error(result, "--upper_group column 'tissue' is not in")
    assert not (tmp_path / "o").exists()
