"""The Python API: scanpy conventions, copy semantics, no mutation of inputs, configs or presets."""

import copy
import inspect
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scnym_cli import api
from scnym_cli.config import PRESETS
from scnym_cli.errors import ScnymError

from conftest import make_counts

FAST = {"n_epochs": 3, "min_epochs": 1, "batch_size": 32, "n_hidden": 16, "patience": 0}


def with_target(n_cells=160, seed=0):
    adata = make_counts(n_cells=n_cells, seed=seed)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.iloc[::4, adata.obs.columns.get_loc("cell_type")] = "Unlabeled"
    return adata


def snapshot(adata):
    return (adata.X.copy(), adata.obs.copy(), dict(adata.obsm), copy.deepcopy(dict(adata.uns)), adata.shape)


def assert_unchanged(adata, before):
    X, obs, obsm, uns, shape = before
    assert adata.shape == shape and (adata.X != X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm) == set(obsm) and set(adata.uns) == set(uns)


def test_train_with_copy_leaves_the_input_untouched(tmp_path):
    adata = with_target()
    before = snapshot(adata)
    config = {"preset": "default", **FAST, "n_epochs": 12}
    config_before = copy.deepcopy(config)
    presets_before = {k: dict(v) for k, v in PRESETS.items()}
    torch.manual_seed(42)
    rng_before = torch.get_rng_state()
    out = api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "model", config=config,
                        copy=True)
    assert_unchanged(adata, before)
    assert config == config_before and {k: dict(v) for k, v in PRESETS.items()} == presets_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert isinstance(out, ad.AnnData) and out is not adata
    assert set(out.obs["scNym"].cat.categories) <= {"type_0", "type_1", "type_2"}
    assert out.obs["scNym_confidence"].between(0, 1).all()
    assert out.obsm["scNym_probabilities"].shape == (160, 3) and out.obsm["X_scnym"].shape == (160, 16)
    results = out.uns["scNym"]
    assert results["train_results"]["n_target"] == 40 and results["params"]["lower_group"] == "cell_type"
    assert (tmp_path / "model" / "all_data" / "model.json").is_file()
    out.write_h5ad(tmp_path / "annotated.h5ad")  # uns holds only what h5ad can store
    labeled = adata.obs["cell_type"] != "Unlabeled"
    assert (out.obs["scNym"][labeled].astype(str) == adata.obs["cell_type"][labeled]).mean() > 0.8


def test_in_place_and_predict(tmp_path):
    adata = with_target(seed=1)
    assert api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m",
                         config={**FAST, "preset": "no_ssl"}, key_added="pred") is None
    assert "pred" in adata.obs and "pred_probabilities" in adata.obsm
    query = make_counts(n_cells=50, seed=9)
    before = snapshot(query)
    result = api.scnym_api(query, "predict", trained_model=tmp_path / "m", copy=True)
    assert_unchanged(query, before)
    assert result.obs["scNym"].notna().all() and result.uns["scNym"]["model_path"].endswith("m")
    # the same model through the CLI gives the same labels
    from typer.testing import CliRunner

    from scnym_cli.cli import app

    query.write_h5ad(tmp_path / "q.h5ad")
    CliRunner().invoke(app, ["predict_cell_types", "--model_path", str(tmp_path / "m"), "--input_counts",
                             str(tmp_path / "q.h5ad"), "--out_path", str(tmp_path / "p")])
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert (table["predicted_label"].to_numpy() == result.obs["scNym"].astype(str).to_numpy()).all()
    assert "evaluation" not in result.uns["scNym"]
    # known labels: scored as the CLI scores a labeled query
    scored = api.scnym_api(query, "predict", trained_model=tmp_path / "m", groupby="cell_type", copy=True)
    evaluation = scored.uns["scNym"]["evaluation"]
    CliRunner().invoke(app, ["predict_cell_types", "--model_path", str(tmp_path / "m"), "--input_counts",
                             str(tmp_path / "q.h5ad"), "--out_path", str(tmp_path / "p2"), "--lower_group",
                             "cell_type"])
    per_class = pd.read_csv(tmp_path / "p2" / "per_class_metrics.csv")
    np.testing.assert_allclose(evaluation["per_class"]["recall"], per_class["recall"])
    summary = json.loads((tmp_path / "p2" / "prediction_summary.json").read_text())
    assert evaluation["metrics"] == pytest.approx(summary["metrics_vs_cell_type"])
    assert np.asarray(evaluation["confusion"]["counts"]).sum() == 50
    scored.write_h5ad(tmp_path / "scored.h5ad")       # h5ad can store the evaluation


def test_scnym_03_nested_config_is_understood(tmp_path):
    adata = with_target(seed=2)
    legacy = {"n_epochs": 2, "optimizer_name": "adadelta", "batch_size": 32, "tensorboard": False,
              "model_kwargs": {"n_hidden": 8, "n_layers": 1, "init_dropout": 0.0, "residual": False},
              "ssl_kwargs": {"T": 0.4, "ramp_epochs": 5, "dan_max_weight": 0.2, "min_epochs": 1,
                             "pseudolabel_min_confidence": 0.5}}
    frozen = copy.deepcopy(legacy)
    out = api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m", config=legacy, copy=True)
    assert legacy == frozen
    params = out.uns["scNym"]["params"]
    assert (params["sharpen_temperature"], params["unsup_ramp_epochs"], params["dan_max_weight"],
            params["n_hidden"], params["pseudolabel_min_confidence"]) == (0.4, 5, 0.2, 8, 0.5)


def test_domain_groupby_is_used(tmp_path):
    adata = with_target(seed=3)
    out = api.scnym_api(adata, "train", groupby="cell_type", domain_groupby="donor", out_path=tmp_path / "m",
                        config={**FAST}, copy=True)
    manifest = json.loads((tmp_path / "m" / "all_data" / "model.json").read_text())
    assert manifest["training"]["domains"] == ["donor_0", "donor_1"]
    assert out.uns["scNym"]["params"]["input_domain_group"] == "donor"


def test_pretrained_names_resolve_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCNYM_MODEL_CACHE", str(tmp_path / "cache"))
    query = make_counts(n_cells=30)
    with pytest.raises(ScnymError, match="not in the local cache .*cache"):
        api.scnym_api(query, "predict", trained_model="pretrained_human")
    adata = with_target(seed=4)
    api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "cache" / "pretrained_human",
                  config={**FAST, "preset": "no_ssl"})
    out = api.scnym_api(query, "predict", trained_model="pretrained_human", copy=True)
    assert out.obs["scNym"].notna().all()
    with pytest.raises(ScnymError, match="neither a model path nor a pretrained model name"):
        api.scnym_api(query, "predict", trained_model="pretrained_martian")


def test_api_errors_are_clear(tmp_path):
    adata = with_target()
    with pytest.raises(ScnymError, match="needs groupby"):
        api.scnym_api(adata, "train", out_path=tmp_path / "m")
    with pytest.raises(ScnymError, match="task must be"):
        api.scnym_api(adata, "fit")
    with pytest.raises(ScnymError, match="needs trained_model"):
        api.scnym_api(adata, "predict")
    with pytest.raises(ScnymError, match="unknown config key 'n_epoch'"):
        api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m", config={"n_epoch": 3})
    with pytest.raises(ScnymError, match="groupby column 'celltype'"):
        api.scnym_api(adata, "train", groupby="celltype", out_path=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_input_keys_mean_what_they_mean_on_the_command_line(tmp_path):
    """The API reads an AnnData through the same loader as the command line reads a file: gene lists, gene
    maps, metadata and target files apply; a Config keeps its own n_folds."""
    from scnym_cli.config import Config
    from scnym_cli.store import load_model

    adata = make_counts(n_cells=120, seed=4)
    labels = adata.obs["cell_type"].astype(str)
    del adata.obs["cell_type"]
    pd.DataFrame({"cell_id": adata.obs_names, "annotation": labels.to_numpy()}).to_csv(tmp_path / "meta.csv",
                                                                                        index=False)
    (tmp_path / "genes.txt").write_text("\n".join(adata.var_names[:30]) + "\n")
    target = make_counts(n_cells=40, seed=5)
    target.var_names = [f"mouse_{g}" for g in target.var_names]
    target.write_h5ad(tmp_path / "target.h5ad")
    pd.DataFrame({"from": target.var_names, "to": adata.var_names}).to_csv(tmp_path / "map.csv", index=False)
    config = {**FAST, "training_metadata": str(tmp_path / "meta.csv"), "genes_to_use": str(tmp_path / "genes.txt"),
              "unlabeled_counts": str(tmp_path / "target.h5ad"), "gene_map": str(tmp_path / "map.csv")}
    out = api.scnym_api(adata, "train", groupby="annotation", out_path=tmp_path / "m", config=config, copy=True)
    assert load_model(tmp_path / "m").genes == list(adata.var_names[:30])
    assert out.uns["scNym"]["train_results"]["n_target"] == 40
    assert "annotation" not in adata.obs
    out.obs["annotation"] = labels.to_numpy()
    api.scnym_api(out, "train", groupby="annotation", out_path=tmp_path / "cv",
                  config=Config(**FAST, n_folds=2, num_threads=1))
    assert (tmp_path / "cv" / "fold01" / "model.json").is_file()


def test_errors_name_api_arguments_not_command_line_flags(tmp_path):
    adata = make_counts(n_cells=120, seed=3)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m", config={**FAST, "preset": "no_ssl"})
    with pytest.raises(ScnymError) as caught:
        api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m",
                      config={**FAST, "preset": "no_ssl"})
    assert "config={'overwrite': True}" in str(caught.value) and "--" not in str(caught.value)
    with pytest.raises(ScnymError) as caught:
        api.scnym_api(adata, "predict", trained_model=tmp_path / "m", config={"ensemble": "folds"})
    assert "config['ensemble']" in str(caught.value) and "--" not in str(caught.value)
    assert api._in_api_words("check --lower_group and --model_path; pass --backed false") == (
        "check groupby and trained_model; pass config={'backed': False}")


def test_atlas2target(tmp_path):
    atlas = make_counts(n_cells=80, seed=5)
    atlas.obs["annotations"] = atlas.obs["cell_type"].astype(str)
    query = make_counts(n_cells=40, seed=6)[:, 5:].copy()   # fewer genes than the atlas
    atlas.write_h5ad(tmp_path / "atlas.h5ad")
    before_atlas, before_query = snapshot(atlas), snapshot(query)
    for source in (atlas, tmp_path / "atlas.h5ad"):
        joined = api.atlas2target(query, source)
        assert joined.shape == (120, 55)
        assert (joined.obs["annotations"][-40:] == "Unlabeled").all()
        assert set(joined.obs["annotations"][:80]) == {"type_0", "type_1", "type_2"}
        assert set(joined.obs["scNym_dataset"]) == {"atlas_reference", "target_query"}
        assert joined.obs_names.is_unique
        np.testing.assert_allclose(np.expm1(joined.X[:80].toarray()).sum(1)[:3], 1e6 * np.expm1(
            joined.X[:3].toarray()).sum(1) / 1e6, rtol=1e-5)
    assert_unchanged(atlas, before_atlas)
    assert_unchanged(query, before_query)
    with pytest.raises(ScnymError, match="no labels in obs.*atlas_groupby"):
        api.atlas2target(query, atlas, key_added="missing")
    # an atlas whose label column has another name than the column the result should have
    joined = api.atlas2target(query, atlas, atlas_groupby="cell_type", key_added="reference_labels")
    assert (joined.obs["reference_labels"][-40:] == "Unlabeled").all()
    assert set(joined.obs["reference_labels"][:80]) == {"type_0", "type_1", "type_2"}
    with pytest.raises(ScnymError, match="does not exist"):
        api.atlas2target(query, tmp_path / "absent.h5ad")


def test_scnym_interpret_with_unlabeled_cells(tmp_path):
    train = make_counts(n_cells=240, seed=12)
    api.scnym_api(train, "train", groupby="cell_type", out_path=tmp_path / "m",
                  config={**FAST, "n_epochs": 20, "n_hidden": 64, "preset": "no_ssl"})
    data = with_target(n_cells=120, seed=13)          # a quarter of the cells are 'Unlabeled'
    before = snapshot(data)
    result = api.scnym_interpret(data, "cell_type", "type_1", trained_model=tmp_path / "m",
                                 config={"eg_samples": 16})
    assert_unchanged(data, before)
    saliency, gradients = result["saliency"], result["gradients"]
    assert isinstance(saliency, pd.Series) and saliency.is_monotonic_decreasing and len(saliency) == 60
    assert gradients.shape == ((data.obs["cell_type"] == "type_1").sum(), 60)
    assert set(gradients.index) <= set(data.obs_names)
    assert len(set(saliency.index[:5]) & {f"gene{j:03d}" for j in range(5, 10)}) >= 3
    by_class = api.scnym_interpret(data, "cell_type", "type_1", source="type_0", trained_model=tmp_path / "m",
                                   config={"eg_samples": 16})
    assert not by_class["saliency"].equals(saliency)
    with pytest.raises(ScnymError, match="does not know class 'Unlabeled'"):
        api.scnym_interpret(data, "cell_type", "Unlabeled", trained_model=tmp_path / "m")


PUBLIC = [api.scnym_api, api.scnym_interpret, api.atlas2target]


@pytest.mark.parametrize("function", PUBLIC, ids=lambda f: f.__name__)
def test_public_signatures_follow_scanpy(function):
    """adata first; options keyword-only (scnym_api's task may be positional, as in scNym);
    every parameter documented; copy returns a copy."""
    parameters = list(inspect.signature(function).parameters.values())
    assert parameters[0].name == "adata"
    positional_ok = {"scnym_api": {"adata", "task"}, "atlas2target": {"adata", "atlas"},
                     "scnym_interpret": {"adata", "groupby", "target"}}[function.__name__]
    for parameter in parameters:
        if parameter.name not in positional_ok:
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, parameter.name
        assert f"\n    {parameter.name}\n" in function.__doc__, f"{parameter.name} is not documented"
    assert "Returns" in function.__doc__
    if "copy" in inspect.signature(function).parameters:
        assert inspect.signature(function).parameters["copy"].default is False


def test_model_and_predictions_objects(tmp_path):
    """For people who want objects: Model.load -> predict -> Predictions (table, AnnData, scores, report),
    the same results as scnym_api's predict."""
    from scnym_cli import Model, Predictions

    adata = make_counts(n_cells=150, seed=7)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m",
                  config={**FAST, "preset": "no_ssl", "n_folds": 2})
    query = make_counts(n_cells=60, seed=8)
    query.obs["cell_type"] = query.obs["cell_type"].astype(str)
    before = snapshot(query)
    model = Model.load(tmp_path / "m", coverage=0.9)
    assert model.classes == ["type_0", "type_1", "type_2"] and len(model.genes) == 60 and "3 classes" in repr(model)
    predictions = model.predict(query)
    assert_unchanged(query, before)
    assert isinstance(predictions, Predictions)
    table = predictions.table()
    assert list(table.columns[:3]) == ["cell_id", "predicted_label", "confidence"]
    assert {"prediction_set", "set_size", "disagreement", "novelty"} <= set(table.columns) and len(table) == 60
    via_api = api.scnym_api(query, "predict", trained_model=tmp_path / "m", config={"coverage": 0.9}, copy=True)
    assert (via_api.obs["scNym"].astype(str).to_numpy() == predictions.labels.astype(str)).all()
    annotated = query.copy()
    predictions.to_anndata(annotated, key="mine")
    assert (annotated.obs["mine"].astype(str) == via_api.obs["scNym"].astype(str)).all()
    assert annotated.obsm["mine_probabilities"].shape == (60, 3)
    evaluation = predictions.write_report(query.obs["cell_type"], tmp_path / "report")
    assert 0 <= evaluation.metrics["balanced_accuracy"] <= 1 and "coverage" in evaluation.per_class.columns
    assert (tmp_path / "report" / "confusion_matrix.png").is_file()
    with pytest.raises(ScnymError, match="other cells"):
        predictions.to_anndata(query[:10].copy())
    with pytest.raises(ScnymError, match="config\\['ensemble'\\]"):
        Model.load(tmp_path / "m" / "fold00", ensemble="folds")
