"""Fold-level jobs (--fold / --folds) and collect_folds give the same run as one job."""

import json
import shutil

import pandas as pd

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_h5ad

FLAGS = [*FAST_FLAGS[:FAST_FLAGS.index("--n_folds")], *FAST_FLAGS[FAST_FLAGS.index("--n_folds") + 2:],
         "--n_folds", "3"]


def train(runner, data, out, *extra):
    return invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                  "--out_path", out, *FLAGS, *extra)


def test_separate_fold_jobs_collect_to_the_same_run(runner, tmp_path):
    data = write_h5ad(make_counts(n_cells=150, seed=21), tmp_path / "x.h5ad")
    assert train(runner, data, tmp_path / "whole").exit_code == 0
    jobs = tmp_path / "jobs"
    for args in (["--fold", "0"], ["--folds", "1,all_data"]):   # array tasks, in any order
        result = train(runner, data, jobs, *args)
        assert result.exit_code == 0, result.output
    assert not (jobs / "fold_eval_acc.csv").exists() and not (jobs / "run_summary.json").exists()
    result = invoke(runner, "collect_folds", "--out_path", jobs)
    assert_one_line_error(result, "3 of 4 models are complete", "fold02 missing", "--fold")
    assert train(runner, data, jobs, "--fold", "2").exit_code == 0
    result = invoke(runner, "collect_folds", "--out_path", jobs)
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(jobs / "fold_eval_acc.csv"),
                                  pd.read_csv(tmp_path / "whole" / "fold_eval_acc.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(jobs / "fold_eval_losses.csv"),
                                  pd.read_csv(tmp_path / "whole" / "fold_eval_losses.csv"))
    whole = json.loads((tmp_path / "whole" / "run_summary.json").read_text())
    collected = json.loads((jobs / "run_summary.json").read_text())
    assert collected["cross_validation"] == whole["cross_validation"]
    assert (jobs / "confusion_matrix.png").exists() and not any(p.is_symlink() for p in jobs.iterdir())


def test_fold_job_guards(runner, tmp_path):
    data = write_h5ad(make_counts(n_cells=150, seed=21), tmp_path / "x.h5ad")
    assert train(runner, data, tmp_path / "r", "--fold", "1").exit_code == 0
    assert_one_line_error(train(runner, data, tmp_path / "r", "--fold", "1"), "already holds results", "fold01")
    assert train(runner, data, tmp_path / "r", "--fold", "1", "--overwrite", "true").exit_code == 0
    assert_one_line_error(train(runner, data, tmp_path / "r", "--fold", "4"), "--fold 4 is out of range")
    assert_one_line_error(train(runner, data, tmp_path / "r", "--folds", "0,x"), "'x' is not a fold")
    assert_one_line_error(train(runner, data, tmp_path / "r", "--fold", "0", "--folds", "1"), "not both")
    # a job with other settings cannot be collected with the rest
    for fold in ("0", "2", "3"):
        extra = ["--lr", "0.5"] if fold == "2" else []
        assert train(runner, data, tmp_path / "r", "--fold", fold, *extra).exit_code == 0
    assert_one_line_error(invoke(runner, "collect_folds", "--out_path", tmp_path / "r"), "different data or settings")
    shutil.rmtree(tmp_path / "r" / "fold00" / "00_best_model_weights.safetensors", ignore_errors=True)
    (tmp_path / "r" / "fold00" / "00_best_model_weights.safetensors").unlink(missing_ok=True)
    assert_one_line_error(invoke(runner, "collect_folds", "--out_path", tmp_path / "r"),
                          "fold00 incomplete (no 00_best_model_weights.safetensors)")
    assert_one_line_error(invoke(runner, "collect_folds", "--out_path", tmp_path / "none"), "no scnym_config.json")
