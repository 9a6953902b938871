"""Model cards: a README.md in every model directory and run, written from the manifest; scnym print_model."""

import json
import shutil

import pandas as pd
import yaml

from scnym_cli.cli import app

from conftest import assert_one_line_error


def _header(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def test_every_model_and_the_run_carry_a_card_written_from_their_manifests(trained_run):
    summary = json.loads((trained_run / "run_summary.json").read_text())
    per_class = pd.read_csv(trained_run / "per_class_metrics.csv")
    for directory in (trained_run, trained_run / "all_data", trained_run / "fold00", trained_run / "fold01"):
        text = (directory / "README.md").read_text()
        header = _header(text)
        model = directory if directory != trained_run else trained_run / "all_data"
        manifest = json.loads((model / "model.json").read_text())
        assert header["library_name"] == "scnym" and header["scnym_version"] == manifest["package_version"]
        assert header["classes"] == manifest["classes"] and header["genes"]["count"] == len(manifest["genes"])
        assert header["training_data"]["sha256"] == manifest["data_fingerprint"]["sha256"]
        assert header["meaning_sha256"] == manifest["meaning_sha256"]
        assert header["calibration"]["temperature"] == manifest["temperature"]
        for section in ("## Training data", "## Evaluation", "## Calibration and uncertainty", "## Intended use",
                        "## Limitations", "## How to use"):
            assert section in text, (directory, section)
    run_card = (trained_run / "README.md").read_text()
    cv = _header(run_card)["cross_validation"]
    assert cv["n_folds"] == summary["n_folds"]
    assert abs(cv["balanced_accuracy"]["mean"] - summary["cross_validation"]["balanced_accuracy"]["mean"]) < 1e-4
    for name in per_class["class"]:        # the per-class recall of the pooled held-out cells
        assert f"| {name} | " in run_card
    assert "cross_validation" not in _header((trained_run / "fold00" / "README.md").read_text())


def test_print_model_shows_the_card(runner, trained_run, tmp_path):
    shown = runner.invoke(app, ["print_model", str(trained_run)], env={"COLUMNS": "120"})
    assert shown.exit_code == 0, shown.output
    assert "scnym training run" in shown.output and "Per class" in shown.output and "library_name" in shown.output
    raw = runner.invoke(app, ["print_model", str(trained_run / "all_data"), "--raw"])
    assert raw.exit_code == 0 and raw.output == (trained_run / "all_data" / "README.md").read_text()
    # a model of an older scnym, without a card: one is written from its manifest for display
    old = tmp_path / "old"
    shutil.copytree(trained_run / "fold01", old)
    (old / "README.md").unlink()
    generated = runner.invoke(app, ["print_model", str(old), "--raw"])
    assert generated.exit_code == 0 and _header(generated.output)["model_name"] == "fold01"
    assert not (old / "README.md").exists()          # showing writes nothing
    missing = runner.invoke(app, ["print_model", str(tmp_path)])
    assert_one_line_error(missing, "is not a scnym model", "give a model directory or a run directory")
