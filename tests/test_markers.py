"""find_cell_type_markers: both methods find planted markers; outputs; errors."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import assert_one_line_error, invoke, make_counts, write_h5ad

PLANTED = {f"type_{k}": {f"gene{j:03d}" for j in range(k * 5, (k + 1) * 5)} for k in range(3)}


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory):
    from typer.testing import CliRunner

    from scnym_cli.cli import app

    directory = tmp_path_factory.mktemp("markers")
    data = write_h5ad(make_counts(n_cells=300, seed=11), directory / "x.h5ad")
    result = CliRunner().invoke(app, ["train_tissue_independent", "--input_counts", str(data), "--lower_group",
                                      "cell_type", "--out_path", str(directory / "model"), "--n_folds", "0",
                                      "--n_epochs", "25", "--min_epochs", "5", "--batch_size", "32",
                                      "--n_hidden", "64"])
    assert result.exit_code == 0, result.output
    return directory


def run_markers(runner, marker_model, out, *args):
    result = invoke(runner, "find_cell_type_markers", "--model_path", marker_model / "model", "--input_counts",
                    marker_model / "x.h5ad", "--lower_group", "cell_type", "--out_path", out,
                    "--optimization_steps", "150", "--eg_samples", "32", *args)
    return result


def test_both_methods_rank_the_planted_markers_first(runner, marker_model, tmp_path):
    result = run_markers(runner, marker_model, tmp_path / "m", "--write_cell_attributions", "true")
    assert result.exit_code == 0, result.output
    for method, column in (("expected_gradients", "saliency"), ("input_optimization", "score")):
        table = pd.read_csv(tmp_path / "m" / f"{method}_markers.csv")
        for name, planted in PLANTED.items():
            top = list(table[table["class"] == name].sort_values("rank")["gene"][:5])
            assert len(set(top) & planted) >= 4, (method, name, top)
            of_class = table[table["class"] == name]
            groups = [of_class] if method == "input_optimization" else [g for _, g in of_class.groupby("kind")]
            for group in groups:
                assert (np.diff(group[column].to_numpy()) <= 1e-9).all()
    eg = pd.read_csv(tmp_path / "m" / "expected_gradients_markers.csv")
    top = eg[(eg["class"] == "type_1") & (eg["rank"] <= 5)]
    assert (top["kind"] == "expressed").all() and (top["n_cells"] == 100).all()
    type_0 = eg[eg["class"] == "type_0"]
    kinds = type_0.sort_values("rank")["kind"].to_numpy()
    assert (kinds[: (kinds == "expressed").sum()] == "expressed").all()   # expressed markers come first
    saliency = pd.read_csv(tmp_path / "m" / "expected_gradients_saliency.csv", index_col=0)
    assert list(saliency.columns) == ["type_0", "type_1", "type_2"] and len(saliency) == 60
    optima = pd.read_csv(tmp_path / "m" / "input_optimization_optima.csv", index_col=0)
    assert (optima.to_numpy() >= 0).all() and optima.shape == (3, 60)
    import anndata as ad

    cells = ad.read_h5ad(tmp_path / "m" / "cell_attributions" / "type_0.h5ad")
    assert cells.shape == (100, 60)
    np.testing.assert_allclose(np.asarray(cells.X).mean(0), saliency["type_0"].to_numpy(), rtol=1e-4, atol=1e-7)
    summary = json.loads((tmp_path / "m" / "markers_summary.json").read_text())
    assert summary["top_markers_method"] == "expected_gradients" and len(summary["top_markers"]["type_2"]) == 20
    assert (tmp_path / "m" / "marker_heatmap.png").stat().st_size > 0


def test_one_class_one_source_and_input_optimization_without_data(runner, marker_model, tmp_path):
    result = run_markers(runner, marker_model, tmp_path / "m", "--marker_classes", "type_2", "--marker_source",
                         "type_0")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "m" / "expected_gradients_markers.csv")
    assert set(table["class"]) == {"type_2"} and set(table["source"]) == {"type_0"}
    result = invoke(runner, "find_cell_type_markers", "--model_path", marker_model / "model", "--out_path",
                    tmp_path / "io", "--marker_methods", "input_optimization", "--optimization_steps", "50")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "io" / "expected_gradients_markers.csv").exists()


def test_same_seed_same_markers(runner, marker_model, tmp_path):
    tables = []
    for name in ("a", "b"):
        assert run_markers(runner, marker_model, tmp_path / name, "--marker_classes", "type_0").exit_code == 0
        tables.append(pd.read_csv(tmp_path / name / "expected_gradients_markers.csv"))
    pd.testing.assert_frame_equal(*tables)


@pytest.mark.parametrize("args,fragments", [
    (["--marker_classes", "type_9"], ["does not know class 'type_9'", "type_0, type_1, type_2"]),
    (["--marker_source", "type_7"], ["no cell is labelled 'type_7'"]),
    (["--lower_group", "celltype"], ["--lower_group column 'celltype'"]),
])
def test_marker_errors(runner, marker_model, tmp_path, args, fragments):
    result = run_markers(runner, marker_model, tmp_path / "m", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "m").exists()


def test_expected_gradients_need_data(runner, marker_model, tmp_path):
    result = invoke(runner, "find_cell_type_markers", "--model_path", marker_model / "model", "--out_path",
                    tmp_path / "m")
    assert_one_line_error(result, "expected gradients need labeled cells")
