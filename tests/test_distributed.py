"""Data-parallel training under torchrun: 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scnym_cli.data.batches import EpochSampler

from conftest import make_counts, write_h5ad


def torchrun(tmp_path, *args):
    env = {**os.environ, "SCNYM_VERIFY_RANKS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "scnym_cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("semi_supervised", [False, True], ids=["supervised", "semi-supervised"])
def test_two_process_gloo_training(tmp_path, semi_supervised):
    data = write_h5ad(make_counts(n_cells=240, seed=5), tmp_path / "ref.h5ad")
    extra = []
    if semi_supervised:
        target = make_counts(n_cells=100, seed=6)
        target.obs_names = [f"t{i}" for i in range(100)]
        extra = ["--unlabeled_counts", write_h5ad(target, tmp_path / "target.h5ad")]
    result = torchrun(tmp_path, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                      "--out_path", tmp_path / "run", "--n_folds", "2", "--n_epochs", "3", "--min_epochs", "1",
                      "--batch_size", "32", "--n_hidden", "16", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    # written once, by rank 0: one finished run and nothing else beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ref.h5ad", "run"] + (["target.h5ad"] if semi_supervised else []))
    assert (tmp_path / "run" / "run_summary.json").is_file()
    for name in ("fold00", "fold01", "all_data"):
        manifest = json.loads((tmp_path / "run" / name / "model.json").read_text())
        training = manifest["training"]
        batches_per_epoch = len(EpochSampler(np.arange(training["n_fit"]), 32, min_batches=30))   # several passes
        assert training["distributed"] == {"world_size": 2,
                                           "verified_steps": batches_per_epoch * training["epochs_run"]}
        assert training["semi_supervised"] is semi_supervised
        log = pd.read_csv(tmp_path / "run" / name / f"{name}_log.csv")
        assert len(log) == training["epochs_run"]
    assert pd.read_csv(tmp_path / "run" / "fold_eval_acc.csv")["accuracy"].between(0, 1).all()
