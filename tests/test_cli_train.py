"""train_tissue_independent through the CLI: output layout, manifest, atomic outputs."""

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from scnym_cli.cli import app
from scnym_cli.store import load_model

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_h5ad

MODEL_FILES = {"00_best_model_weights.safetensors", "model.json", "train_idx.csv", "test_idx.csv", "val_idx.csv",
               "predictions.csv", "labels.csv", "training_curve.png"}


def test_output_layout(trained_run):
    top = {p.name for p in trained_run.iterdir()}
    assert {"celltype_label.csv", "fold_eval_acc.csv", "fold_eval_losses.csv", "fold00", "fold01", "all_data",
            "confusion_matrix.png", "confusion_matrix.csv", "per_class_metrics.csv", "reliability.csv",
            "reliability_diagram.png", "scnym_config.json", "run_summary.json"} <= top
    # the pooled held-out cells of every fold, class by class
    per_class = pd.read_csv(trained_run / "per_class_metrics.csv")
    held_out = sum(len(pd.read_csv(trained_run / f / "predictions.csv")) for f in ("fold00", "fold01"))
    assert per_class["support"].sum() == held_out and per_class["recall"].between(0, 1).all()
    assert not any(name.startswith(".") for name in top)
    assert not list(trained_run.parent.glob(".run.partial-*"))
    for name in ("fold00", "fold01", "all_data"):
        files = {p.name for p in (trained_run / name).iterdir()}
        assert MODEL_FILES | {f"{name}_log.csv", f"{name}_parameters.json"} <= files, name
        assert not any(f.endswith((".pkl", ".pt", ".pth")) for f in files)


def test_fold_tables(trained_run):
    folds = pd.read_csv(trained_run / "fold_eval_acc.csv")
    assert list(folds["fold"]) == ["fold00", "fold01"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "n_cells", "best_epoch"} <= set(folds.columns)
    assert folds["accuracy"].between(0, 1).all() and folds["n_cells"].sum() == 300
    losses = pd.read_csv(trained_run / "fold_eval_losses.csv")
    assert list(losses.columns) == ["fold", "loss"] and (losses["loss"] > 0).all()
    labels = pd.read_csv(trained_run / "celltype_label.csv")
    assert list(labels["label"]) == ["type_0", "type_1", "type_2"]


def test_splits_partition_the_cells_and_predictions_match(trained_run):
    held = []
    for fold in ("fold00", "fold01"):
        d = trained_run / fold
        ids = {n: set(pd.read_csv(d / f"{n}_idx.csv")["cell_id"]) for n in ("train", "test", "val")}
        assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["test"] & ids["val"]
        assert len(ids["train"] | ids["test"] | ids["val"]) == 300
        predictions = pd.read_csv(d / "predictions.csv")
        assert set(predictions["cell_id"]) == ids["val"]
        probabilities = predictions.filter(like="prob_").to_numpy()
        np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(predictions["confidence"], probabilities.max(1), rtol=1e-6)
        # the reported fold accuracy is recomputable from the written predictions
        accuracy = (predictions["predicted_label"] == predictions["true_label"]).mean()
        folds = pd.read_csv(trained_run / "fold_eval_acc.csv").set_index("fold")
        assert accuracy == pytest.approx(folds.loc[fold, "accuracy"])
        held += list(ids["val"])
    assert sorted(held) == sorted(f"cell{i:04d}" for i in range(300))


def test_manifest_and_weights(trained_run):
    manifest = json.loads((trained_run / "all_data" / "model.json").read_text())
    assert manifest["format_version"] == 1 and manifest["package_version"]
    assert manifest["genes"] == [f"gene{j:03d}" for j in range(60)]
    assert manifest["classes"] == ["type_0", "type_1", "type_2"]
    assert manifest["model"]["class"] == "CellTypeClassifier"
    assert manifest["model"]["kwargs"]["n_hidden"] == 32 and manifest["model"]["kwargs"]["n_genes"] == 60
    assert manifest["config"]["n_epochs"] == 4 and manifest["seed"] == 0
    assert len(manifest["data_fingerprint"]["sha256"]) == 64 and manifest["data_fingerprint"]["n_cells"] == 300
    assert manifest["training"]["n_held_out"] == 0
    fold = json.loads((trained_run / "fold00" / "model.json").read_text())
    assert fold["data_fingerprint"] == manifest["data_fingerprint"]
    state = load_file(str(trained_run / "all_data" / "00_best_model_weights.safetensors"))
    assert state["encoder.0.linear.weight"].shape == (32, 60)
    loaded = load_model(trained_run)
    assert loaded.directory.name == "all_data" and loaded.classes == manifest["classes"]
    parameters = json.loads((trained_run / "all_data" / "all_data_parameters.json").read_text())
    assert parameters == manifest["config"] == json.loads((trained_run / "scnym_config.json").read_text())


def test_epoch_log(trained_run):
    log = pd.read_csv(trained_run / "fold00" / "fold00_log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert {"train_loss", "supervised_loss", "train_accuracy", "select_loss", "select_accuracy",
            "select_balanced_accuracy", "lr", "is_best", "seconds"} <= set(log.columns)


def test_refuses_to_overwrite_a_finished_run_and_overwrites_when_asked(runner, trained_run, tmp_path):
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    before = (trained_run / "run_summary.json").read_text()
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", trained_run, *FAST_FLAGS)
    assert_one_line_error(result, "already holds results", "--overwrite")
    assert (trained_run / "run_summary.json").read_text() == before
    out = tmp_path / "run"
    # a boolean key takes a value, or stands alone as a bare flag (before another option or last)
    for overwrite in (["--overwrite", "true"], ["--overwrite"], ["--overwrite", "--quiet"]):
        result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                        "--out_path", out, *overwrite, *FAST_FLAGS)
        assert result.exit_code == 0, result.output
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    *FAST_FLAGS, "--out_path", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run_summary.json").read_text())["n_cells"] == 120
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", out, "--overwrite", "false", *FAST_FLAGS)
    assert_one_line_error(result, "already holds results")


def test_help_shows_allowed_values_and_each_default_once(runner):
    result = runner.invoke(app, ["predict_cell_types", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "[auto|counts|log1p|log2_1p|log10_1p|as_is]" in text and "[all|all_data|folds]" in text
    assert "(default: var_names / 'Gene'). (default" not in text and "(default: var_names / 'Gene')" in text
    assert "unfinished run of the same command there). (default: false); a bare flag means true" in text


def test_a_failed_run_leaves_nothing(runner, tmp_path, monkeypatch):
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    import scnym_cli.workflows.train as train_module

    def explode(*args, **kwargs):
        raise train_module.ScnymError("simulated failure in the middle of training")

    original = train_module.train_one_model
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            explode()
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_model", fail_on_second)
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", tmp_path / "run", *FAST_FLAGS)
    assert_one_line_error(result, "simulated failure")
    assert not (tmp_path / "run").exists()   # nothing that looks like a result
    # only the unfinished run, hidden, keeping the model that was finished: --resume continues from it
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert [p.name for p in hidden] == [".run.partial-train"]
    assert (hidden[0] / "fold00" / "model.json").is_file() and not (hidden[0] / "fold01").exists()


def test_a_run_that_fails_before_any_model_is_finished_leaves_nothing(runner, tmp_path, monkeypatch):
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    import scnym_cli.workflows.train as train_module

    def explode(*args, **kwargs):
        raise train_module.ScnymError("simulated failure in the first model")

    monkeypatch.setattr(train_module, "train_one_model", explode)
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", tmp_path / "run", *FAST_FLAGS)
    assert_one_line_error(result, "simulated failure")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "run"]


def test_no_cross_validation(runner, tmp_path):
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", tmp_path / "run", *FAST_FLAGS, "--n_folds", "0")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "all_data", "celltype_label.csv", "scnym_config.json", "run_summary.json", "README.md", "report.html"}


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "scnym_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("scnym ")


def test_identical_weights_give_identical_weight_files(tmp_path):
    """The weights checksum in model.json depends only on the weights."""
    import torch

    from scnym_cli.nn import CellTypeClassifier
    from scnym_cli.store import save_model

    torch.manual_seed(0)
    model = CellTypeClassifier(n_genes=5, n_classes=2, n_hidden=4)
    for name in ("a", "b", "c"):
        save_model(tmp_path / name, model, genes=list("vwxyz"), classes=["p", "q"], config={})
    files = {(tmp_path / n / "00_best_model_weights.safetensors").read_bytes() for n in "abc"}
    assert len(files) == 1


def test_overwriting_leaves_nothing_of_the_earlier_run_and_names_unfinished_folders(runner, tmp_path):
    """Fewer folds than before: the old fold02 goes; a prediction without logits: the old logits.csv goes; a
    user's own file stays; folders of killed runs are named, never used or removed behind a running job."""
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    run = tmp_path / "run"
    flags = [f for f in FAST_FLAGS]
    flags[flags.index("--n_folds") + 1] = "3"
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", run, *flags)
    assert result.exit_code == 0, result.output
    (run / "my_notes.txt").write_text("mine")
    killed = tmp_path / ".run.partial-abc123"
    killed.mkdir()
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", run, "--overwrite", *FAST_FLAGS)
    assert result.exit_code == 0, result.output
    assert (run / "fold01").is_dir() and not (run / "fold02").exists()
    assert (run / "my_notes.txt").read_text() == "mine" and killed.is_dir()
    assert "unfinished output folder" in " ".join(result.output.split()) and ".run.partial-abc123" in result.output
    out = tmp_path / "p"
    for logits in ("true", "false"):
        result = invoke(runner, "predict_cell_types", "--model_path", run, "--input_counts", data, "--out_path", out,
                        "--overwrite", "--write_logits", logits, "--write_h5ad", "false")
        assert result.exit_code == 0, result.output
        assert (out / "logits.csv").exists() == (logits == "true")


def test_files_of_the_users_own_under_names_a_run_writes_are_not_replaced_without_overwrite(runner, tmp_path):
    data = write_h5ad(make_counts(n_cells=120), tmp_path / "x.h5ad")
    out = tmp_path / "run"
    out.mkdir()
    (out / "confusion_matrix.csv").write_text("made by another tool\n")
    (out / "notes.txt").write_text("mine\n")
    args = ["train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type", "--out_path", out,
            *FAST_FLAGS]
    assert_one_line_error(invoke(runner, *args), "already holds files this command writes", "confusion_matrix.csv",
                          "--overwrite true")
    assert (out / "confusion_matrix.csv").read_text() == "made by another tool\n"
    assert invoke(runner, *args, "--overwrite").exit_code == 0
    assert (out / "run_summary.json").is_file() and (out / "notes.txt").read_text() == "mine\n"
