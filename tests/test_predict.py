"""predict_cell_types: model resolution, gene alignment, CSV and h5ad outputs, reproducibility."""

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_csv, write_h5ad, write_lines


@pytest.fixture
def query(tmp_path):
    return make_counts(n_cells=90, seed=7)


def predict(runner, model, data, out, *extra):
    result = invoke(runner, "predict_cell_types", "--model_path", model, "--input_counts", data,
                    "--out_path", out, *extra)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "predictions.csv")


def test_prediction_csv(runner, trained_run, tmp_path, query):
    table = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p",
                    "--lower_group", "cell_type")
    # the run's fold models and all_data predict together: their disagreement is a column
    assert list(table.columns[:5]) == ["cell_id", "predicted_label", "confidence", "novelty", "disagreement"]
    assert list(table.columns[5:]) == ["prob_type_0", "prob_type_1", "prob_type_2"]
    assert (table["novelty"] >= 0).all() and (table["novelty"] <= 2).all()      # cosine distances
    assert table["disagreement"].between(0, 1).all()
    assert list(table["cell_id"]) == list(query.obs_names)
    probabilities = table.filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(table["confidence"], probabilities.max(1), rtol=1e-6)
    assert (table["predicted_label"] == np.array(["type_0", "type_1", "type_2"])[probabilities.argmax(1)]).all()
    accuracy = (table["predicted_label"] == query.obs["cell_type"].astype(str).to_numpy()).mean()
    assert accuracy > 0.8
    summary = json.loads((tmp_path / "p" / "prediction_summary.json").read_text())
    assert summary["metrics_vs_cell_type"]["accuracy"] == pytest.approx(accuracy)
    assert summary["gene_overlap"]["fraction_found"] == 1.0


def test_a_labeled_query_gets_per_class_metrics_a_confusion_matrix_and_a_reliability_diagram(
        runner, trained_run, tmp_path, query):
    query = query.copy()
    labels = query.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:7] = "novel_type"                     # a type the model does not know: 7 certain errors
    query.obs["cell_type"] = labels
    table = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p",
                    "--lower_group", "cell_type")
    out = tmp_path / "p"
    per_class = pd.read_csv(out / "per_class_metrics.csv").set_index("class")
    assert list(per_class.index) == ["type_0", "type_1", "type_2", "novel_type"]
    assert per_class.loc["novel_type", "support"] == 7 and not per_class.loc["novel_type", "in_reference"]
    assert per_class.loc["novel_type", "recall"] == 0
    for name in ["type_0", "type_1", "type_2"]:   # recall and precision as counted from the predictions
        is_true, called = labels == name, table["predicted_label"].to_numpy() == name
        assert per_class.loc[name, "support"] == is_true.sum() and per_class.loc[name, "predicted"] == called.sum()
        assert per_class.loc[name, "recall"] == pytest.approx((is_true & called).sum() / is_true.sum())
        assert per_class.loc[name, "precision"] == pytest.approx((is_true & called).sum() / called.sum())
    confusion = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert confusion.to_numpy().sum() == 90 and confusion.loc["novel_type"].sum() == 7
    assert confusion.loc["type_1", "type_1"] == ((labels == "type_1") & (table["predicted_label"] == "type_1")).sum()
    reliability = pd.read_csv(out / "reliability.csv")
    assert reliability["n_cells"].sum() == 83 and len(reliability) == 10      # cells of known types
    assert (out / "confusion_matrix.png").stat().st_size > 0 and (out / "reliability_diagram.png").stat().st_size > 0
    summary = json.loads((out / "prediction_summary.json").read_text())
    assert 0 <= summary["metrics_vs_cell_type"]["ece"] <= 1
    assert [r["class"] for r in summary["per_class_vs_cell_type"]] == list(per_class.index)
    # an unlabeled query writes none of them
    predict(runner, trained_run, write_h5ad(make_counts(n_cells=30, seed=8), tmp_path / "u.h5ad"), tmp_path / "u",
            "--lower_group", "no_such_column")
    assert not (tmp_path / "u" / "per_class_metrics.csv").exists()


def test_novelty_scores_and_unknown_at_a_chosen_rate(runner, trained_run, tmp_path, query):
    import scipy.sparse as sp

    from scnym_cli.store import load_model
    from scnym_cli.train.novelty import MIN_CELLS_PER_CLUSTER

    loaded = load_model(trained_run)
    manifest = loaded.manifest["novelty"]
    assert manifest["n_bank"] > 0 and manifest["n_selection"] == len(loaded.novelty.selection_scores)
    # known cells drawn as the reference's were (the first 300 of this draw are the reference's own cells)
    query = make_counts(n_cells=390, seed=1)[300:].copy()
    # a cell type the model never saw: the planted markers of no class, other genes silent
    novel = make_counts(n_cells=30, seed=11)
    X = novel.X.toarray()
    X[:, :] = 0
    X[:, -10:] = np.random.default_rng(0).poisson(20, size=(30, 10))
    novel.X = sp.csr_matrix(X.astype(np.float32))
    novel.obs_names = [f"n{i}" for i in range(30)]
    novel.obs["cell_type"] = "novel"
    import anndata

    both = anndata.concat([query, novel])
    table = predict(runner, trained_run, write_h5ad(both, tmp_path / "b.h5ad"), tmp_path / "p",
                    "--unknown_rate", "0.2")
    is_novel = table["cell_id"].str.startswith("n").to_numpy()
    assert table["novelty"][is_novel].min() > table["novelty"][~is_novel].median()
    # a cell's novelty is its query cluster's (120 cells: 6 clusters of at least 20); 0 clusters: its own
    assert table["novelty"].nunique() <= 120 // MIN_CELLS_PER_CLUSTER
    # float32 products: in bfloat16 (the default on CPUs that have it) near cells' distances can round alike
    own = predict(runner, trained_run, tmp_path / "b.h5ad", tmp_path / "own", "--novelty_clusters", "0",
                  "--inference_precision", "float32")
    # each cell's own: quantiles among the model-selection cells', so steps of 1 / (2 x their number)
    assert own["novelty"].nunique() > 2 * table["novelty"].nunique()
    assert own["novelty"].between(0, 1).all()
    assert own["novelty"][is_novel].median() > own["novelty"][~is_novel].median()
    summary = json.loads((tmp_path / "p" / "prediction_summary.json").read_text())
    assert summary["novelty_clusters"] == table["novelty"].nunique()
    assert summary["novelty"]["views"] == "distance and mixing"
    assert summary["novelty"]["selection_cells"] == min(len(loaded.novelty.selection_scores), 2000)
    unknown = table["predicted_label"].to_numpy() == "Unknown"
    # Unknown exactly where the novelty is above the rate's threshold (the model-selection cells' novelty against
    # this query), and far more often for the new type
    threshold = summary["novelty"]["unknown_above"]
    assert 0 < threshold < 1
    np.testing.assert_array_equal(unknown, table["novelty"].to_numpy() > threshold)
    assert unknown[is_novel].mean() > unknown[~is_novel].mean() + 0.5
    annotated = ad.read_h5ad(tmp_path / "p" / "annotated.h5ad")
    np.testing.assert_allclose(annotated.obs["scNym_novelty"], table["novelty"], rtol=1e-5)
    summary = json.loads((tmp_path / "p" / "prediction_summary.json").read_text())
    assert summary["unknown_cells"] == unknown.sum() and summary["unknown_rate"] == 0.2
    # the rate is the share of the model-selection cells above the threshold
    threshold = loaded.novelty.threshold(0.05)
    assert np.mean(loaded.novelty.selection_scores > threshold) <= 0.05 + 1 / len(loaded.novelty.selection_scores)


def test_novelty_reference_is_checked_and_required_for_unknown_rate(runner, trained_run, tmp_path, query):
    data = write_h5ad(query, tmp_path / "q.h5ad")
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run / "all_data", damaged)
    with open(damaged / "novelty_reference.safetensors", "ab") as f:
        f.write(b"x")
    result = invoke(runner, "predict_cell_types", "--model_path", damaged, "--input_counts", data,
                    "--out_path", tmp_path / "p1")
    assert_one_line_error(result, "novelty_reference.safetensors", "checksum")
    older = tmp_path / "older"             # a model saved before novelty references: no column, no --unknown_rate
    shutil.copytree(trained_run / "all_data", older)
    (older / "novelty_reference.safetensors").unlink()
    manifest = json.loads((older / "model.json").read_text())
    del manifest["novelty"], manifest["meaning_sha256"]     # older models had neither
    (older / "model.json").write_text(json.dumps(manifest))
    assert "novelty" not in predict(runner, older, data, tmp_path / "p2").columns
    result = invoke(runner, "predict_cell_types", "--model_path", older, "--input_counts", data,
                    "--out_path", tmp_path / "p3", "--unknown_rate", "0.05")
    assert_one_line_error(result, "--unknown_rate", "--unknown_threshold")
    assert not (tmp_path / "p3").exists()


def test_a_model_saved_before_the_mixing_view_scores_the_distance(runner, trained_run, tmp_path, query):
    from scnym_cli.store import file_sha256, load_model, meaning_sha256
    from scnym_cli.train.novelty import NoveltyReference

    data = write_h5ad(query, tmp_path / "q.h5ad")
    earlier = tmp_path / "earlier"          # its novelty reference keeps no model-selection embeddings
    shutil.copytree(trained_run / "all_data", earlier)
    reference = NoveltyReference.load(earlier)
    reference.selection = None
    reference.save(earlier)
    manifest = json.loads((earlier / "model.json").read_text())
    manifest["novelty"]["sha256"] = file_sha256(earlier / "novelty_reference.safetensors")
    manifest["meaning_sha256"] = meaning_sha256(manifest)
    (earlier / "model.json").write_text(json.dumps(manifest))
    table = predict(runner, earlier, data, tmp_path / "p", "--unknown_rate", "0.2", "--novelty_clusters", "0",
                    "--inference_precision", "float32")
    summary = json.loads((tmp_path / "p" / "prediction_summary.json").read_text())
    assert summary["novelty"]["views"] == "distance (unscaled)"
    # each cell's distance to the reference, Unknown above the model-selection cells' distance at the rate
    loaded = load_model(earlier)
    assert loaded.novelty.selection is None
    assert summary["novelty"]["unknown_above"] == pytest.approx(loaded.novelty.threshold(0.2))
    unknown = table["predicted_label"].to_numpy() == "Unknown"
    np.testing.assert_array_equal(unknown, table["novelty"].to_numpy() > loaded.novelty.threshold(0.2))


def test_annotated_h5ad(runner, trained_run, tmp_path, query):
    table = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p",
                    "--prediction_key", "celltype_pred", "--write_embedding", "true", "--write_logits", "yes")
    annotated = ad.read_h5ad(tmp_path / "p" / "annotated.h5ad")
    assert list(annotated.obs_names) == list(query.obs_names)
    assert (annotated.obs["celltype_pred"].astype(str).to_numpy() == table["predicted_label"].to_numpy()).all()
    np.testing.assert_allclose(annotated.obs["celltype_pred_confidence"], table["confidence"], rtol=1e-6)
    np.testing.assert_allclose(annotated.obsm["celltype_pred_probabilities"],   # (CSV rounds float32 subnormals)
                               table.filter(like="prob_").to_numpy(), rtol=1e-5, atol=1e-30)
    assert annotated.obsm["X_scnym"].shape == (90, 32)
    assert (annotated.X != query.X).nnz == 0  # the data themselves are untouched
    embedding = pd.read_csv(tmp_path / "p" / "embedding.csv")
    np.testing.assert_allclose(embedding.iloc[:, 1:].to_numpy(), annotated.obsm["X_scnym"], rtol=1e-5, atol=1e-6)
    logits = pd.read_csv(tmp_path / "p" / "logits.csv")
    assert list(logits.columns) == ["cell_id", "logit_type_0", "logit_type_1", "logit_type_2"]


def test_model_path_forms_give_the_same_predictions(runner, trained_run, tmp_path, query):
    data = write_h5ad(query, tmp_path / "q.h5ad")
    by_run = predict(runner, trained_run, data, tmp_path / "a", "--write_h5ad", "false", "--ensemble", "all_data")
    by_dir = predict(runner, trained_run / "all_data", data, tmp_path / "b")
    by_weights = predict(runner, trained_run / "all_data" / "00_best_model_weights.safetensors", data, tmp_path / "c")
    pd.testing.assert_frame_equal(by_run, by_dir)
    pd.testing.assert_frame_equal(by_run, by_weights)
    assert not (tmp_path / "a" / "annotated.h5ad").exists()
    by_fold = predict(runner, trained_run / "fold01", data, tmp_path / "d")
    assert not by_fold.equals(by_run)


def test_gene_alignment_in_prediction(runner, trained_run, tmp_path, query):
    reference = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "ref")
    # reordered genes + extra genes: identical predictions
    shuffled = query[:, np.random.default_rng(0).permutation(query.n_vars)].copy()
    extra = ad.AnnData(X=np.ones((query.n_obs, 3), dtype=np.float32), obs=query.obs[[]],
                       var=pd.DataFrame(index=["x1", "x2", "x3"]))
    widened = ad.concat([shuffled, extra], axis=1)
    widened.obs = query.obs.copy()
    widened.X = widened.X.astype(np.float32)
    # CPM is computed over the query's own genes, so extra genes change the scale: drop them from the total
    # by giving them zero counts
    widened.X[:, -3:] = 0
    out = predict(runner, trained_run, write_h5ad(widened, tmp_path / "w.h5ad"), tmp_path / "w")
    pd.testing.assert_frame_equal(out, reference, rtol=1e-4)
    summary = json.loads((tmp_path / "w" / "gene_overlap.json").read_text())
    assert summary["n_extra"] == 3 and summary["n_missing"] == 0
    # missing genes: reported, still predicted
    partial = query[:, 10:].copy()
    out = predict(runner, trained_run, write_h5ad(partial, tmp_path / "m.h5ad"), tmp_path / "m")
    overlap = json.loads((tmp_path / "m" / "gene_overlap.json").read_text())
    assert overlap["n_missing"] == 10 and overlap["fraction_found"] == pytest.approx(50 / 60)
    assert len(out) == 90


def test_too_little_overlap(runner, trained_run, tmp_path, query):
    tiny = query[:, :20].copy()
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts",
                    write_h5ad(tiny, tmp_path / "t.h5ad"), "--out_path", tmp_path / "p")
    assert_one_line_error(result, "only 20 of 60 model genes", "--min_gene_overlap")
    assert not (tmp_path / "p").exists()
    predict(runner, trained_run, tmp_path / "t.h5ad", tmp_path / "p", "--min_gene_overlap", "0.3")


def test_csv_query_and_training_gene_names(runner, trained_run, tmp_path, query):
    genes = write_lines(tmp_path / "genes.txt", query.var_names)
    csv_path = write_csv(query, tmp_path / "q.csv", header=False)
    by_csv = predict(runner, trained_run, csv_path, tmp_path / "c", "--input_gene_names", genes,
                     "--training_gene_names", genes)
    by_h5ad = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "h")
    pd.testing.assert_frame_equal(by_csv, by_h5ad, rtol=1e-5)
    write_lines(genes, list(query.var_names)[::-1])
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", csv_path,
                    "--input_gene_names", tmp_path / "genes.txt", "--training_gene_names", genes,
                    "--out_path", tmp_path / "x")
    assert_one_line_error(result, "--training_gene_names", "differs")


def test_unknown_threshold(runner, trained_run, tmp_path, query):
    table = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p",
                    "--unknown_threshold", "0.9")
    low = table["confidence"] < 0.9
    assert (table.loc[low, "predicted_label"] == "Unknown").all()
    assert (table.loc[~low, "predicted_label"] != "Unknown").all()


def test_same_seed_on_cpu_gives_identical_predictions(runner, tmp_path, query):
    data = write_h5ad(make_counts(n_cells=150, seed=3), tmp_path / "ref.h5ad")
    q = write_h5ad(query, tmp_path / "q.h5ad")
    tables = []
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                        "--out_path", tmp_path / run, "--seed", seed, "--init_dropout", "0.2",
                        "--mixup_alpha", "0.3", "--balance_classes", "true", *FAST_FLAGS)
        assert result.exit_code == 0, result.output
        tables.append(predict(runner, tmp_path / run, q, tmp_path / f"p{run}"))
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
    assert not np.array_equal(tables[0]["confidence"], tables[2]["confidence"])


def test_refuses_to_overwrite_predictions(runner, trained_run, tmp_path, query):
    data = write_h5ad(query, tmp_path / "q.h5ad")
    predict(runner, trained_run, data, tmp_path / "p")
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "already holds results")
    predict(runner, trained_run, data, tmp_path / "p", "--overwrite", "true")


def test_damaged_models(runner, trained_run, tmp_path, query):
    data = write_h5ad(query, tmp_path / "q.h5ad")
    model = tmp_path / "model"
    shutil.copytree(trained_run / "all_data", model)
    weights = model / "00_best_model_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = invoke(runner, "predict_cell_types", "--model_path", model, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "checksum")
    manifest = json.loads((model / "model.json").read_text())
    manifest.pop("weights_sha256"), manifest.pop("meaning_sha256")   # a model with no checksums at all
    (model / "model.json").write_text(json.dumps(manifest))
    result = invoke(runner, "predict_cell_types", "--model_path", model, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "could not load weights")
    (model / "model.json").write_text("{not json")
    result = invoke(runner, "predict_cell_types", "--model_path", model, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "not valid JSON")
    result = invoke(runner, "predict_cell_types", "--model_path", tmp_path, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "holds no model.json")
    assert not (tmp_path / "p").exists()


def test_architecture_comes_from_the_manifest_not_the_callers_config(runner, trained_run, tmp_path, query):
    config = tmp_path / "c.txt"
    config.write_text("n_hidden: 999\nn_layers: 7\nresidual: true\n")
    a = predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "a")
    b = predict(runner, trained_run, tmp_path / "q.h5ad", tmp_path / "b", "-c", config)
    pd.testing.assert_frame_equal(a, b)


def test_a_logits_csv_of_the_users_own_is_not_replaced_without_overwrite(runner, trained_run, tmp_path, query):
    data = write_h5ad(query, tmp_path / "q.h5ad")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "logits.csv").write_text("mine\n")
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "already holds files this command writes", "logits.csv")
    assert (tmp_path / "p" / "logits.csv").read_text() == "mine\n"


def test_annotated_outputs_record_what_made_them(runner, trained_run, tmp_path, query):
    """Provenance in uns[key], the same from the command line's annotated.h5ad and from the API."""
    from scnym_cli import __version__
    from scnym_cli.api import scnym_api

    predict(runner, trained_run, write_h5ad(query, tmp_path / "q.h5ad"), tmp_path / "p", "--prediction_chunk_size", "50")
    from_cli = ad.read_h5ad(tmp_path / "p" / "annotated.h5ad").uns["scNym"]
    from_api = scnym_api(query.copy(), task="predict", trained_model=trained_run, copy=True).uns["scNym"]
    for recorded in (from_cli, from_api):
        assert recorded["scnym_version"] == __version__ and recorded["model_path"] == str(trained_run)
        members = recorded["models"]
        assert set(members) == {"fold00", "fold01", "all_data"}            # the ensemble of the run
        manifest = json.loads((trained_run / "all_data" / "model.json").read_text())
        assert members["all_data"]["meaning_sha256"] == manifest["meaning_sha256"]
        assert members["all_data"]["weights_sha256"] == manifest["weights_sha256"]
        assert members["all_data"]["training_data_sha256"] == manifest["data_fingerprint"]["sha256"]
        assert recorded["gene_overlap"]["n_model_genes"] == len(manifest["genes"])
        assert list(recorded["classes"]) == manifest["classes"]
    assert from_cli["params"]["prediction_chunk_size"] == 50 and from_api["params"]["prediction_chunk_size"] != 50


def test_inference_precision(runner, trained_run, tmp_path, query, monkeypatch):
    import torch

    from scnym_cli.train import device as device_module

    data = write_h5ad(query, tmp_path / "q.h5ad")
    tables, summaries = {}, {}
    for precision in ("float32", "bfloat16"):
        tables[precision] = predict(runner, trained_run, data, tmp_path / precision, "--inference_precision",
                                    precision)
        summaries[precision] = json.loads((tmp_path / precision / "prediction_summary.json").read_text())
        assert summaries[precision]["inference_precision"] == precision
    # bfloat16 products move probabilities in the third decimal, and leave labels as they were
    f32, b16 = tables["float32"], tables["bfloat16"]
    assert (f32["predicted_label"] == b16["predicted_label"]).mean() >= 0.97
    np.testing.assert_allclose(f32.filter(like="prob_"), b16.filter(like="prob_"), atol=0.05)
    np.testing.assert_allclose(f32["novelty"], b16["novelty"], atol=0.01)
    assert not np.array_equal(f32.filter(like="prob_").to_numpy(), b16.filter(like="prob_").to_numpy())
    # auto: bfloat16 where the CPU has bfloat16 instructions, float32 where it would be emulated
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(device_module, "native_bfloat16_cpu", lambda native=native: native)
        assert device_module.inference_dtype(cpu, "auto") == expected
    assert device_module.inference_dtype(cpu, "float32") == torch.float32
    assert_one_line_error(invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                                 "--out_path", tmp_path / "x", "--inference_precision", "half"), "half")


def test_label_metrics_match_scikit_learn_and_add_up_over_blocks():
    """The label metrics come from a table of counts over integer codes (no per-cell text at atlas scale):
    the same figures as scikit-learn's, and a streamed query scored block by block gets the scores of the
    whole (confusion, per-class table, ECE, reliability bins, set coverage)."""
    import warnings

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support

    from scnym_cli.report import LabeledTally, evaluate_labeled
    from scnym_cli.train.metrics import calibration_error, classification_metrics, per_class_metrics

    rng = np.random.default_rng(1)
    names = np.array(["a", "b", "c", "x", "Unknown", "y"], dtype=object)
    classes = ["b", "a", "c"]
    for _ in range(30):
        n = int(rng.integers(1, 300))
        truth, predicted = names[rng.choice([0, 1, 2, 3, 5], n)], names[rng.integers(0, 5, n)]
        confidence, in_set, set_size = rng.random(n), rng.random(n) < 0.8, rng.integers(0, 4, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {"accuracy": accuracy_score(truth, predicted),
                        "balanced_accuracy": balanced_accuracy_score(truth, predicted),
                        "macro_f1": f1_score(truth, predicted, average="macro", labels=np.unique(truth))}
            labels = classes + sorted(set(truth) - set(classes))
            precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels,
                                                                             zero_division=0)
        metrics = classification_metrics(truth, predicted)
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, abs=1e-12)
        per_class = per_class_metrics(truth, predicted, classes)
        assert list(per_class["class"]) == labels
        np.testing.assert_allclose(per_class[["precision", "recall", "f1"]].to_numpy().T, [precision, recall, f1])
        np.testing.assert_array_equal(per_class["support"], support)

        whole = evaluate_labeled(truth, predicted, confidence, classes, in_set, set_size)
        known = np.isin(truth, classes)
        assert whole.metrics["ece"] == pytest.approx(calibration_error(confidence[known], truth[known] ==
                                                                       predicted[known]), nan_ok=True)
        assert whole.metrics["coverage"] == pytest.approx(in_set[known].mean() if known.any() else np.nan,
                                                          nan_ok=True)
        tally = LabeledTally(classes, with_sets=True)
        for part in np.split(np.arange(n), np.sort(rng.integers(0, n, 3))):
            tally.add(truth[part], predicted[part], confidence[part], in_set[part], set_size[part])
        blocks = tally.evaluation()
        assert blocks.metrics == pytest.approx(whole.metrics, nan_ok=True)
        pd.testing.assert_frame_equal(blocks.per_class, whole.per_class)
        pd.testing.assert_frame_equal(blocks.confusion, whole.confusion)
        pd.testing.assert_frame_equal(blocks.reliability, whole.reliability)


def test_depth_over_the_models_genes_puts_a_query_cut_to_them_on_the_references_scale(runner, tmp_path, query):
    """A query log-normalized over all its genes and then cut to the model's genes (as many shared h5ad files are)
    is renormalized over what is left: without --depth_over_genes its cells look several times deeper than the
    reference's. With it, the model measures every cell's depth over its own genes, and the cut query's
    predictions equal those of the same cells given as whole counts."""
    import scipy.sparse as sp

    reference = write_h5ad(make_counts(n_cells=150, seed=3), tmp_path / "ref.h5ad")
    kept = write_lines(tmp_path / "genes.txt", [f"gene{j:03d}" for j in range(20)])
    whole = write_h5ad(query, tmp_path / "whole.h5ad")
    counts = sp.csr_matrix(query.X, dtype=np.float64)
    per_10k = sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts
    per_10k.data = np.log1p(per_10k.data)
    cut = ad.AnnData(X=sp.csr_matrix(per_10k[:, :20], dtype=np.float32), obs=query.obs, var=query.var.iloc[:20])
    cut = write_h5ad(cut, tmp_path / "cut.h5ad")
    tables = {}
    for depth in ("true", "false"):
        result = invoke(runner, "train_tissue_independent", "--input_counts", reference, "--lower_group",
                        "cell_type", "--out_path", tmp_path / depth, "--genes_to_use", kept,
                        "--depth_over_genes", depth, "--seed", 1, *FAST_FLAGS)
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / depth / "all_data" / "model.json").read_text())
        assert manifest["model"]["kwargs"].get("depth_over_genes", False) == (depth == "true")
        tables[depth] = [predict(runner, tmp_path / depth, data, tmp_path / f"{depth}_{data.stem}")
                         for data in (whole, cut)]
    probabilities = [c for c in tables["true"][0] if c.startswith("prob_")]
    with_depth, without = tables["true"], tables["false"]
    np.testing.assert_allclose(with_depth[1][probabilities], with_depth[0][probabilities], atol=1e-4)
    assert (with_depth[1]["predicted_label"] == with_depth[0]["predicted_label"]).all()
    # the same cut without it: the shift is there to see
    assert np.abs(without[1][probabilities].to_numpy() - without[0][probabilities].to_numpy()).max() > 0.01
