"""The shared trainer: it learns, it is reproducible, early stopping, sampling, logging."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scnym_cli.config import Config
from scnym_cli.data import normalize
from scnym_cli.data.batches import EpochSampler
from scnym_cli.data.matrix import dense_rows
from scnym_cli.data.splits import all_data_split, cross_validation_splits, selection_split
from scnym_cli.train import Trainer, TrainingData
from scnym_cli.train.averaging import warmed_decay, weight_average
from scnym_cli.train.inference import forward_rows
from scnym_cli.train.losses import inverse_frequency_weights, soft_cross_entropy
from scnym_cli.train.metrics import classification_metrics, expected_calibration_error
from scnym_cli.workflows.settings import training_settings
from scnym_cli.workflows.train import build_model

from conftest import make_counts

FAST = dict(n_epochs=8, min_epochs=1, batch_size=32, n_hidden=32, patience=0, seed=0)


def synthetic_training_data(n_cells=300, seed=0):
    adata = make_counts(n_cells=n_cells, seed=seed)
    X, _ = normalize(sp.csr_matrix(adata.X))
    codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    folds = cross_validation_splits(np.arange(n_cells), codes, 3, 0.1, seed)
    return TrainingData(X, codes, folds[0], 3)


def fit(config, data, device="cpu"):
    model = build_model(config, data.X.shape[1], data.n_classes)
    result = Trainer(training_settings(config), torch.device(device), show_progress=False).fit(model, data)
    return model, result


def fit_logged(config, data, log_path):
    """A fit that writes its epoch log; (model, result, the log)."""
    model = build_model(config, data.X.shape[1], 3)
    result = Trainer(training_settings(config), torch.device("cpu"), log_path=log_path,
                     show_progress=False).fit(model, data)
    return model, result, pd.read_csv(log_path)


def selection_loss(model, data) -> float:
    """The cross-entropy of the model-selection cells under the model's current weights."""
    outputs = forward_rows(model, data.X, data.split.select, torch.device("cpu"))
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(outputs.logits),
                                                   torch.from_numpy(data.codes[data.split.select])))


def test_it_learns_planted_markers():
    data = synthetic_training_data()
    model, result = fit(Config(**FAST), data)
    outputs = forward_rows(model, data.X, data.split.held_out, torch.device("cpu"))
    accuracy = (outputs.logits.argmax(1) == data.codes[data.split.held_out]).mean()
    assert accuracy > 0.9
    assert list(result.history.columns[:3]) == ["epoch", "lr", "train_loss"]
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]


def test_same_seed_same_model_different_seed_different_model():
    data = synthetic_training_data()
    a, _ = fit(Config(**FAST), data)
    b, _ = fit(Config(**FAST), data)
    c, _ = fit(Config(**{**FAST, "seed": 1}), data)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_fit_leaves_the_callers_rng_alone():
    data = synthetic_training_data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(Config(**{**FAST, "n_epochs": 2}), data)
    assert torch.equal(torch.rand(3), expected)


def test_best_epoch_is_restored_and_respects_min_epochs(tmp_path):
    data = synthetic_training_data()
    model, result, log = fit_logged(Config(**{**FAST, "n_epochs": 6, "min_epochs": 4}), data, tmp_path / "log.csv")
    assert len(log) == 6 and result.best_epoch >= 4
    eligible = log[log["epoch"] >= 4]
    assert result.best_epoch == int(eligible.loc[eligible["select_loss"].idxmin(), "epoch"])
    assert log.loc[log["epoch"] < 4, "is_best"].sum() == 0
    # the restored weights give the logged selection loss of the best epoch
    assert selection_loss(model, data) == pytest.approx(eligible["select_loss"].min(), rel=1e-5)


def test_weight_average_follows_the_weights_with_a_warmed_up_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    averaged = weight_average(model, 0.9)
    linear, norm = model[0], model[1]
    steps = []
    for _ in range(30):
        with torch.no_grad():
            linear.weight.add_(torch.randn(2, 2))
            norm.num_batches_tracked += 1
        steps.append(linear.weight.detach().clone())
        averaged.update_parameters(model)
        if len(steps) == 5:   # the plain mean of the steps so far while they are fewer than the horizon (10)
            assert torch.allclose(averaged.module[0].weight, torch.stack(steps).mean(0), atol=1e-6)
    expected = torch.stack(steps[:10]).mean(0)     # then a moving average with the decay
    for weight in steps[10:]:
        expected = 0.9 * expected + 0.1 * weight
    assert torch.allclose(averaged.module[0].weight, expected, atol=1e-6)
    assert not torch.allclose(averaged.module[0].weight, linear.weight)
    assert int(averaged.module[1].num_batches_tracked) == 30        # integer buffers are copied
    assert warmed_decay(0.999, 0) == 0.0 and warmed_decay(0.999, 3) == 0.75 and warmed_decay(0.9, 1000) == 0.9
    with pytest.raises(ValueError):
        weight_average(model, 1.0)


def test_weight_averaging_evaluates_and_keeps_the_average(tmp_path):
    data = synthetic_training_data()
    model, result, log = fit_logged(Config(**{**FAST, "n_epochs": 4, "weight_averaging": 0.95}), data,
                                    tmp_path / "log.csv")
    # the kept weights give the selection loss logged for the best epoch: the average was evaluated and kept
    assert selection_loss(model, data) == pytest.approx(float(log.loc[log["epoch"] == result.best_epoch, "select_loss"].iloc[0]),
                                        rel=1e-5)
    plain, _ = fit(Config(**{**FAST, "n_epochs": 4}), data)
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    held_out = forward_rows(model, data.X, data.split.held_out, torch.device("cpu"))
    assert (held_out.logits.argmax(1) == data.codes[data.split.held_out]).mean() > 0.9


def test_early_stopping_with_patience():
    data = synthetic_training_data()
    _, result = fit(Config(**{**FAST, "n_epochs": 60, "patience": 2, "selection_metric": "accuracy"}), data)
    assert result.stopped_early and result.epochs_run < 60
    assert result.epochs_run - result.best_epoch == 2


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_other_optimizers_train(optimizer):
    data = synthetic_training_data()
    _, result = fit(Config(**{**FAST, "optimizer": optimizer, "lr": 0.01 if optimizer != "sgd" else 0.1}), data)
    assert result.history["select_accuracy"].max() > 0.8
    if optimizer == "sgd":  # cosine schedule lowers the learning rate
        assert result.history["lr"].iloc[-1] < result.history["lr"].iloc[0]


def test_mixup_and_class_weights_train():
    data = synthetic_training_data()
    _, result = fit(Config(**{**FAST, "mixup_alpha": 0.3, "weight_classes": True}), data)
    assert result.history["select_accuracy"].max() > 0.8


def test_balanced_sampler_draws_classes_equally():
    codes = np.array([0] * 900 + [1] * 90 + [2] * 10)
    sampler = EpochSampler(np.arange(1000), 100, codes=codes, balance_classes=True, seed=0)
    drawn = np.concatenate([np.concatenate(list(sampler.epoch())) for _ in range(5)])
    shares = np.bincount(codes[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)
    plain = np.concatenate(list(EpochSampler(np.arange(1000), 100, seed=0).epoch()))
    assert sorted(plain) == list(range(1000))


@pytest.mark.parametrize("setting, weight_classes, adapting, balanced", [
    (None, False, True, True), (None, False, False, False), (None, True, True, False),
    (False, False, True, False), (True, False, False, True)])
def test_labeled_batches_are_class_balanced_when_adapting_unless_told(monkeypatch, setting, weight_classes, adapting,
                                                                      balanced):
    import dataclasses

    data = synthetic_training_data()
    if adapting:   # the held-out cells play an unlabeled target
        domains = np.zeros(len(data.codes), dtype=np.int64)
        domains[data.split.held_out] = 1
        data = dataclasses.replace(data, unlabeled=data.split.held_out, domains=domains)
    asked = []
    original = Trainer._sampler

    def recording(self, data, rows, *, balance_classes, seed, min_batches=0):
        asked.append((len(rows), balance_classes))
        return original(self, data, rows, balance_classes=balance_classes, seed=seed, min_batches=min_batches)

    monkeypatch.setattr(Trainer, "_sampler", recording)
    config = Config(**{**FAST, "n_epochs": 1, "balance_classes": setting, "weight_classes": weight_classes})
    fit(config, data)
    assert asked[0] == (len(data.split.fit), balanced)          # the labeled cells' batches
    assert all(not b for _, b in asked[1:])                      # target cells: drawn as they come


def test_sampler_drops_a_last_batch_of_one():
    batches = list(EpochSampler(np.arange(65), 32, seed=0).epoch())
    assert [len(b) for b in batches] == [32, 32]
    assert [len(b) for b in EpochSampler(np.arange(5), 32, seed=0).epoch()] == [5]


def test_dense_rows_gathers_exactly_the_rows():
    X = sp.random(50, 20, density=0.2, format="csr", random_state=0, dtype=np.float32)
    rows = np.array([49, 0, 7, 7])
    np.testing.assert_array_equal(dense_rows(X, rows), X.toarray()[rows])


def test_splits_are_stratified_disjoint_and_seeded():
    codes = np.repeat(np.arange(4), [100, 50, 20, 10])
    rows = np.arange(len(codes))
    splits = cross_validation_splits(rows, codes, 5, 0.1, seed=3)
    held = np.concatenate([s.held_out for s in splits])
    assert sorted(held) == list(rows)
    for s in splits:
        assert not set(s.fit) & set(s.select) and not set(s.fit) & set(s.held_out)
        assert set(s.fit) | set(s.select) | set(s.held_out) == set(rows)
        np.testing.assert_allclose(np.bincount(codes[s.held_out]), [20, 10, 4, 2])
    again = cross_validation_splits(rows, codes, 5, 0.1, seed=3)
    assert all(np.array_equal(a.select, b.select) for a, b in zip(splits, again))
    fit_rows, select = selection_split(rows, codes, 0.1, seed=0)
    assert np.bincount(codes[select]).tolist() == [10, 5, 2, 1]
    assert len(all_data_split(rows, codes, 0.1, 0).held_out) == 0


def test_soft_cross_entropy_matches_torch_and_applies_log_softmax_once():
    logits = torch.randn(6, 4)
    target = torch.tensor([0, 3, 1, 1, 2, 0])
    one_hot = torch.nn.functional.one_hot(target, 4).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, target))
    weights = inverse_frequency_weights(target, 4)
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot, weights),
                               (torch.nn.functional.cross_entropy(logits, target, reduction="none")
                                * weights[target]).mean())


def test_metrics():
    truth = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 0, 0, 1])
    m = classification_metrics(truth, predicted)
    assert m["accuracy"] == pytest.approx(5 / 6) and m["balanced_accuracy"] == pytest.approx(0.75)
    perfect = np.eye(3)[[0, 1, 2]]
    assert expected_calibration_error(perfect, np.array([0, 1, 2])) == 0.0
    overconfident = np.array([[0.99, 0.01]] * 10)
    assert expected_calibration_error(overconfident, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.49)
    from scnym_cli.train.metrics import calibration_error   # the core, from confidence and correctness

    assert calibration_error(np.full(10, 0.99), np.arange(10) < 5) == pytest.approx(0.49)


def test_calibration_error_floor_is_what_a_calibrated_model_shows_at_that_size():
    from scnym_cli.train.metrics import calibration_error, calibration_error_floor, confidence_bins
    rng = np.random.default_rng(3)
    confidence = np.clip(rng.beta(20, 1.5, size=300), 0.05, 1.0)   # mostly near 0.95, like a query's calls
    calibrated = [calibration_error(confidence, rng.random(300) < confidence) for _ in range(400)]
    bins = confidence_bins(confidence, rng.random(300) < confidence, 15)
    floor = calibration_error_floor(bins)
    # the floor is the median of a calibrated model's ECE at this size: far from 0 for 300 cells
    assert floor == pytest.approx(np.median(calibrated), abs=0.004)
    assert floor > 0.01
    # seeded, its own generator: the same figure every time, the caller's global state untouched
    state = np.random.get_state()
    assert calibration_error_floor(bins) == floor
    assert np.array_equal(np.random.get_state()[1], state[1])
    # an overconfident model (accuracy 0.1 below its confidence) stands well above it; more cells, lower floor
    overconfident = calibration_error(confidence, rng.random(300) < confidence - 0.1)
    assert overconfident > floor + 0.05
    big = np.tile(confidence, 100)
    assert calibration_error_floor(confidence_bins(big, rng.random(big.size) < big, 15)) < floor / 5
    assert np.isnan(calibration_error_floor(np.zeros((3, 15))))


def test_small_data_epochs_make_at_least_min_steps_each():
    sampler = EpochSampler(np.arange(100), 32, seed=0, min_batches=10)
    batches = list(sampler.epoch())
    assert len(batches) == len(sampler) == 12 and all(len(b) == 32 for b in batches)   # 4 passes of 100 cells
    drawn = np.concatenate(batches)
    assert set(drawn) == set(range(100)) and np.bincount(drawn).max() <= 4   # whole shuffled passes
    assert len(EpochSampler(np.arange(1000), 32, seed=0, min_batches=10)) == 31   # large data: one pass
    data = synthetic_training_data()
    _, result = fit(Config(**{**FAST, "n_epochs": 2, "min_steps_per_epoch": 20}), data)
    assert len(result.history) == 2


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine"])
def test_learning_rate_schedules_step_per_batch(schedule):
    from scnym_cli.train.optim import cosine, one_cycle

    data = synthetic_training_data()
    _, result = fit(Config(**{**FAST, "optimizer": "adamw", "lr": 0.01, "lr_schedule": schedule}), data)
    lrs = result.history["lr"].to_numpy()
    assert result.history["select_accuracy"].max() > 0.8
    if schedule == "one_cycle":   # up to the peak, then down to almost nothing
        assert lrs.max() == pytest.approx(0.01, rel=0.2) and lrs[0] < lrs.max() and lrs[-1] < 0.2 * lrs.max()
        assert one_cycle(0, 100) == pytest.approx(1 / 25) and one_cycle(30, 100) == pytest.approx(1.0)
        assert one_cycle(100, 100) == pytest.approx(1e-5) and one_cycle(500, 100) == one_cycle(100, 100)
    else:
        assert np.all(np.diff(lrs) < 0) and cosine(0, 10) == 1.0 and cosine(10, 10) == pytest.approx(1e-4)


def test_default_threads_follow_the_cpus_the_process_may_use(monkeypatch):
    import os

    from scnym_cli.train import device

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert device.available_cpus() == 8 and device.default_threads() == device.USEFUL_THREADS
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert device.available_cpus() == 1 and device.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    assert device.available_cpus() == 1


def test_flushing_subnormals_survives_a_nested_block():
    """Evaluation inside training used to switch flushing off for every epoch after the first."""
    from scnym_cli.train.device import flush_denormals

    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    with flush_denormals():
        with flush_denormals():
            pass
        assert float(subnormal * 0.5) == 0.0          # still flushed
    assert float(subnormal * 0.5) > 0.0               # restored to torch's default on the way out


def test_training_settings_carry_every_training_key_and_the_defaults_of_config():
    """The trainer takes typed settings, not the command line's Config: each settings field is a Config key
    with the same default (a drift here would make a hand-built trainer differ from a run's)."""
    from dataclasses import fields

    from scnym_cli.train.mixmatch import MixMatchSettings
    from scnym_cli.train.settings import TrainingSettings

    config = Config()
    settings = training_settings(config)
    for f in fields(TrainingSettings):
        if f.name != "semi_supervised":
            assert getattr(TrainingSettings(), f.name) == getattr(config, f.name), f.name
            assert getattr(settings, f.name) == getattr(config, f.name), f.name
    gated = {"pseudolabel_min_confidence", "adaptive_thresholds"}  # MixMatchSettings' documented exceptions
    for f in fields(MixMatchSettings):
        assert getattr(settings.semi_supervised, f.name) == getattr(config, f.name), f.name
        if f.name not in gated:
            assert getattr(MixMatchSettings(), f.name) == getattr(config, f.name), f.name
    changed = training_settings(config.replace(lr=0.5, dan_max_weight=0.3, balance_classes=True))
    assert changed.lr == 0.5 and changed.semi_supervised.dan_max_weight == 0.3 and changed.balance_classes


def test_a_trainer_needs_no_config():
    from scnym_cli.train.settings import TrainingSettings

    data = synthetic_training_data()
    model = build_model(Config(**FAST), data.X.shape[1], data.n_classes)
    settings = TrainingSettings(n_epochs=4, min_epochs=1, batch_size=32, patience=0, min_steps_per_epoch=0)
    result = Trainer(settings, torch.device("cpu"), show_progress=False).fit(model, data)
    assert result.epochs_run == 4 and 1 <= result.best_epoch <= 4
