"""Training that resumes after a kill: checkpoints, --resume, SLURM requeues, unfinished runs found and named.

The central promise: on CPU, a run killed with SIGKILL at any point and resumed gives weights and predictions
bit-identical to a run that was never interrupted (test_a_killed_run_resumes_bit_identical, in subprocesses).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.numpy import load_file

import scnym_cli.train.trainer as trainer_module
from scnym_cli.config import Config
from scnym_cli.data import normalize
from scnym_cli.data.splits import cross_validation_splits
from scnym_cli.train import Trainer, TrainingData
from scnym_cli.train.checkpoint import CheckpointPolicy
from scnym_cli.workflows.settings import training_settings
from scnym_cli.workflows.train import build_model

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_h5ad

REPO = Path(__file__).resolve().parents[1]
MODELS = ("fold00", "fold01", "all_data")
# semi-supervised with every piece of state a checkpoint must carry: the domain head, the mean teacher,
# distribution alignment, FlexMatch thresholds and pseudolabel-balanced target batches (the census)
SEMI_FLAGS = ["--input_domain_group", "donor", "--unsup_mean_teacher", "true", "--pseudolabel_alignment", "true",
              "--balance_target_classes", "true", "--checkpoint_epochs", "2"]


def semi_supervised_reference(path: Path) -> Path:
    """Synthetic cells; donor_1's are unlabeled (the target domain)."""
    adata = make_counts(n_cells=300, seed=1)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[adata.obs["donor"].to_numpy() == "donor_1"] = "Unlabeled"
    adata.obs["cell_type"] = labels
    return write_h5ad(adata, path)


def same_models(a: Path, b: Path, models=MODELS) -> None:
    """Bit-identical weights and predictions, model by model."""
    for name in models:
        weights_a = load_file(a / name / "00_best_model_weights.safetensors")
        weights_b = load_file(b / name / "00_best_model_weights.safetensors")
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            assert np.array_equal(weights_a[key], weights_b[key]), f"{name} {key}"
        pd.testing.assert_frame_equal(pd.read_csv(a / name / "predictions.csv"),
                                      pd.read_csv(b / name / "predictions.csv"), check_exact=True)


# ---------------------------------------------------------------------- the trainer
def _fit_data():
    adata = make_counts(n_cells=240, seed=2)
    X, _ = normalize(sp.csr_matrix(adata.X))
    codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    labeled, target = np.arange(0, 240, 2), np.arange(1, 240, 2)
    codes[target] = -1
    split = cross_validation_splits(labeled, codes, 3, 0.1, 0)[0]
    return TrainingData(X, codes, split, 3, unlabeled=target, domains=(np.arange(240) % 2).astype(np.int64))


def _fit(tmp_path, name, checkpoint=None, weight_averaging=0.0):
    config = Config(n_epochs=6, min_epochs=1, batch_size=32, n_hidden=32, patience=0, unsup_mean_teacher=True,
                    balance_target_classes=True, pseudolabel_alignment=True, weight_averaging=weight_averaging)
    data = _fit_data()
    model = build_model(config, data.X.shape[1], 3, has_target=True)
    trainer = Trainer(training_settings(config), torch.device("cpu"), log_path=tmp_path / f"{name}.csv",
                      show_progress=False, name=name, checkpoint=checkpoint)
    return model, trainer.fit(model, data)


class Killed(Exception):
    pass


@pytest.mark.parametrize("weight_averaging", [0.0, 0.9])
def test_a_fit_resumed_from_its_checkpoint_is_bit_identical(tmp_path, monkeypatch, weight_averaging):
    reference, reference_fit = _fit(tmp_path, "reference", weight_averaging=weight_averaging)
    policy = CheckpointPolicy(tmp_path / "checkpoints" / "m.pt", every_epochs=2, every_seconds=0)

    def die_after_epoch_3(*where):
        if where == ("epoch_end", "m", 3):
            raise Killed

    monkeypatch.setattr(trainer_module, "kill_point", die_after_epoch_3)
    with pytest.raises(Killed):
        _fit(tmp_path, "m", policy, weight_averaging)
    assert policy.path.is_file()     # the checkpoint of epoch 2
    monkeypatch.undo()
    resumed, resumed_fit = _fit(tmp_path, "m", policy, weight_averaging)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed_fit.best_epoch == reference_fit.best_epoch and resumed_fit.temperature == reference_fit.temperature
    # the epoch log holds every epoch once, the resumed ones after those restored from the checkpoint
    assert list(pd.read_csv(tmp_path / "m.csv")["epoch"]) == [1, 2, 3, 4, 5, 6]
    pd.testing.assert_frame_equal(resumed_fit.history.drop(columns="seconds"),
                                  reference_fit.history.drop(columns="seconds"))


def test_an_unreadable_checkpoint_is_named_and_the_fit_starts_over(tmp_path, caplog):
    reference, _ = _fit(tmp_path, "reference")
    policy = CheckpointPolicy(tmp_path / "m.pt", every_epochs=0, every_seconds=0)
    policy.path.write_bytes(b"PK\x03\x04 torn")
    resumed, _ = _fit(tmp_path, "m", CheckpointPolicy(policy.path, every_epochs=2))
    assert "cannot be read" in caplog.text and "starts from its first epoch" in caplog.text
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ---------------------------------------------------------------------- runs (CLI, in process)
def train(runner, data, out, *extra):
    return invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                  "--out_path", out, *FAST_FLAGS, "--checkpoint_epochs", "1", *extra)


def _interrupt_at(monkeypatch, point):
    """Make the run's trainer raise SIGUSR1 at ``point`` (what a batch system sends before its time limit)."""
    def at_point(*where):
        if where == point:
            signal.raise_signal(signal.SIGUSR1)

    monkeypatch.setattr(trainer_module, "kill_point", at_point)


def test_a_signal_stops_the_run_with_a_checkpoint_and_resume_finishes_it(runner, tmp_path, monkeypatch):
    data = write_h5ad(make_counts(n_cells=150), tmp_path / "x.h5ad")
    assert train(runner, data, tmp_path / "reference").exit_code == 0
    handler_before = signal.getsignal(signal.SIGUSR1)
    _interrupt_at(monkeypatch, ("epoch_end", "fold01", 2))
    stopped = train(runner, data, tmp_path / "run")
    assert stopped.exit_code == 75, stopped.output
    assert "stopped by SIGUSR1 after epoch 2" in stopped.output and "--resume true" in stopped.output
    assert not (tmp_path / "run").exists()
    stage = tmp_path / ".run.partial-train"
    assert (stage / "fold00" / "model.json").is_file() and (stage / ".scnym-checkpoints" / "fold01.pt").is_file()
    assert signal.getsignal(signal.SIGUSR1) == handler_before     # the handler found is back
    monkeypatch.undo()

    again = train(runner, data, tmp_path / "run")   # neither --resume nor --overwrite: refused, work untouched
    assert_one_line_error(again, ".run.partial-train", "--resume true", "--overwrite true")
    assert stage.is_dir()
    other = train(runner, data, tmp_path / "run", "--resume", "--n_hidden", "16")
    assert_one_line_error(other, "started with other settings or other data", "--overwrite true")
    assert (stage / "fold00" / "model.json").is_file()

    resumed = train(runner, data, tmp_path / "run", "--resume")
    assert resumed.exit_code == 0, resumed.output
    text = " ".join(resumed.output.split())
    assert "fold00: finished before the run was interrupted; kept" in text
    assert "fold01: resumed from the checkpoint of epoch 2" in text
    same_models(tmp_path / "reference", tmp_path / "run")
    # a finished run keeps no bookkeeping: no checkpoints, no unfinished folder
    assert not stage.exists() and not list((tmp_path / "run").rglob(".scnym-*"))


def test_overwrite_deletes_an_unfinished_run_and_starts_over(runner, tmp_path, monkeypatch):
    data = write_h5ad(make_counts(n_cells=150), tmp_path / "x.h5ad")
    _interrupt_at(monkeypatch, ("epoch_end", "fold00", 2))
    assert train(runner, data, tmp_path / "run").exit_code == 75
    monkeypatch.undo()
    result = train(runner, data, tmp_path / "run", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and "resumed" not in result.output
    assert not (tmp_path / ".run.partial-train").exists()


def test_a_slurm_requeue_resumes_without_being_asked(runner, tmp_path, monkeypatch):
    data = write_h5ad(make_counts(n_cells=150), tmp_path / "x.h5ad")
    _interrupt_at(monkeypatch, ("epoch_end", "all_data", 3))
    assert train(runner, data, tmp_path / "run", "--n_folds", "0").exit_code == 75
    monkeypatch.undo()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    result = train(runner, data, tmp_path / "run", "--n_folds", "0")
    assert result.exit_code == 0, result.output
    assert "all_data: resumed from the checkpoint of epoch 3" in " ".join(result.output.split())


def test_an_unfinished_folder_without_work_or_of_a_command_without_resume_is_removed(runner, tmp_path,
                                                                                   trained_run):
    data = write_h5ad(make_counts(n_cells=150), tmp_path / "x.h5ad")
    (tmp_path / ".run.partial-train" / "fold00").mkdir(parents=True)    # killed before any model or checkpoint
    result = train(runner, data, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and not (tmp_path / ".run.partial-train").exists()
    leftover = tmp_path / ".out.partial-predict"                        # a prediction killed halfway
    (leftover / "predictions.csv").parent.mkdir(parents=True)
    (leftover / "predictions.csv").write_text("cell_id\n")
    predicted = invoke(runner, "predict_cell_types", "--input_counts", data, "--model_path", trained_run,
                       "--out_path", tmp_path / "out")
    assert predicted.exit_code == 0, predicted.output
    assert ".out.partial-predict" in predicted.output and not leftover.exists()


def test_a_folder_another_live_job_is_writing_is_refused(runner, tmp_path):
    import socket

    data = write_h5ad(make_counts(n_cells=150), tmp_path / "x.h5ad")
    stage = tmp_path / ".run.partial-train"
    stage.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (stage / ".scnym-owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        result = train(runner, data, tmp_path / "run", "--resume")
        assert_one_line_error(result, f"another scnym job (process {sleeper.pid})", "choose another --out_path")
        assert stage.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------- SIGKILL, in subprocesses
def _scnym(data: Path, out: Path, kill_at: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_RESTART_COUNT", "SCNYM_TEST_KILL_AT")}
    if kill_at:
        env["SCNYM_TEST_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "scnym_cli", "train_tissue_independent", "--input_counts", str(data),
               "--lower_group", "cell_type", "--out_path", str(out), *FAST_FLAGS, "--n_epochs", "6", *SEMI_FLAGS,
               *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identical(tmp_path):
    data = semi_supervised_reference(tmp_path / "ref.h5ad")
    reference = _scnym(data, tmp_path / "reference", None)
    assert reference.returncode == 0, reference.stderr
    # each case: the kill points of successive attempts (a resumed run killed again), then a last --resume
    cases = {
        "mid_epoch_then_inside_a_checkpoint_write": ["epoch_end:fold00:3", "checkpoint_write:fold01:4"],
        "between_models": ["model_done:fold00"],
        "inside_the_first_checkpoint_write": ["checkpoint_write:all_data:2"],
        "all_models_done": ["run_done"],
    }
    for case, points in cases.items():
        out = tmp_path / case
        for attempt, point in enumerate(points):
            killed = _scnym(data, out, point, *(["--resume"] if attempt else []))
            assert killed.returncode == -signal.SIGKILL, (case, point, killed.stderr[-2000:])
            assert not out.exists()
        finished = _scnym(data, out, None, "--resume")
        assert finished.returncode == 0, (case, finished.stderr[-2000:])
        same_models(tmp_path / "reference", out)
        reference_table = pd.read_csv(tmp_path / "reference" / "fold_eval_acc.csv")
        pd.testing.assert_frame_equal(reference_table, pd.read_csv(out / "fold_eval_acc.csv"), check_exact=True)
        assert not list(tmp_path.glob(f".{case}.partial-*")) and not list(out.rglob(".scnym-*"))


def test_a_benchmark_running_commands_in_process_stops_with_a_signal_the_run_finished_through(tmp_path, monkeypatch, capsys):
    """SIGTERM / SIGUSR1 is a run's "checkpoint and stop"; a run that ends before it can stop still ends with
    exit 0, and code that runs commands in its own process (bench/accuracy.py --in-process) learns of the
    request from StopRequest.last_request and stops too (a kill of such a benchmark used to go unheard)."""
    import importlib.util

    from scnym_cli.train.checkpoint import StopRequest

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_accuracy_for_signals", bench / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    data = write_h5ad(make_counts(n_cells=150), tmp_path / "x.h5ad")
    command = [*accuracy.scnym_command(), "train_tissue_independent", "--input_counts", str(data),
               "--lower_group", "cell_type", *FAST_FLAGS, "--n_folds", "0"]
    assert accuracy.run([*command, "--out_path", str(tmp_path / "a")], tmp_path / "a.log", True)["seconds"] > 0
    assert StopRequest.last_request is None
    import scnym_cli.workflows.train as train_workflow

    def after_the_last_model(*where):   # the run's training is over: it finishes and exits 0
        if where == ("model_done", "all_data"):
            signal.raise_signal(signal.SIGUSR1)

    monkeypatch.setattr(train_workflow, "kill_point", after_the_last_model)
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1 during"):
        accuracy.run([*command, "--out_path", str(tmp_path / "b")], tmp_path / "b.log", True)
    assert "SIGUSR1 came after training had ended" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "b" / "all_data" / "model.json").is_file()   # the run itself completed
    assert StopRequest.signal_name is None
