"""scnym leaves process-wide state as it found it: the denormal flag, every device's RNG, the plotting
backend, torch's thread count (a notebook calls the API many times and keeps its own settings)."""

import os
import subprocess
import sys
import textwrap

import torch

from scnym_cli import api
from scnym_cli.train import device as device_module
from scnym_cli.train.device import flush_denormals, flushing_denormals, seeded_rng

from conftest import make_counts

FAST = {"n_epochs": 2, "min_epochs": 1, "batch_size": 32, "n_hidden": 16, "patience": 0, "preset": "no_ssl"}


def test_flush_denormals_puts_back_the_setting_it_found():
    try:
        for found in (False, True):
            torch.set_flush_denormal(found)
            with flush_denormals():
                assert flushing_denormals()
                with flush_denormals():  # evaluation inside training
                    pass
                assert flushing_denormals(), "an inner block must not switch flushing off"
            assert flushing_denormals() == found
    finally:
        torch.set_flush_denormal(False)


def test_flush_denormals_is_counted_per_thread():
    """The flag lives in each thread's floating-point state: a block on one thread sets it there, and a block
    ending on another thread (prediction runs two) neither clears it nor leaves it set elsewhere."""
    import threading

    begin, inside, leave, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def worker():
        begin.wait(10)
        with flush_denormals():
            seen["worker, in its block"] = flushing_denormals()
            inside.set()
            leave.wait(10)
            seen["worker, after main's block ended"] = flushing_denormals()
        seen["worker, after its block"] = flushing_denormals()

    torch.set_flush_denormal(False)
    thread = threading.Thread(target=worker)   # made before any block: it starts with flushing off
    thread.start()
    try:
        with flush_denormals():
            begin.set()
            inside.wait(10)
        assert not flushing_denormals(), "main's block ended: main's setting is back"
        leave.set()
        thread.join(10)
    finally:
        torch.set_flush_denormal(False)
    assert seen == {"worker, in its block": True, "worker, after main's block ended": True,
                    "worker, after its block": False}


def test_seeded_rng_restores_the_cpu_generator_and_saves_every_cuda_device(monkeypatch):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with seeded_rng(7):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_rng(7):
        assert torch.equal(torch.rand(3), first)
    # torch.manual_seed seeds every CUDA device too: all of them must be saved and put back
    saved = []

    class Recorder:
        def __init__(self, devices, **kwargs):
            saved.append(list(devices))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(device_module.torch.random, "fork_rng", Recorder)
    monkeypatch.setattr(device_module.torch, "manual_seed", lambda seed: None)
    with seeded_rng(1):
        pass
    assert saved == [[0, 1]]


def test_plots_do_not_switch_the_callers_matplotlib_backend(tmp_path):
    """A notebook's inline backend must survive scnym drawing its PNGs (run in a fresh interpreter: the
    backend is chosen once per process)."""
    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        import pandas as pd
        from pathlib import Path
        from scnym_cli.report import plot_confusion_matrix
        table = pd.DataFrame([[5, 1], [0, 4]], index=["a", "b"], columns=["a", "b"])
        plot_confusion_matrix(table, Path({str(tmp_path / 'confusion.png')!r}), "t")
        print(matplotlib.get_backend(), len(plt.get_fignums()))
    """)
    env = {**os.environ, "MPLBACKEND": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["svg", "0"]
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_api_calls_give_back_the_callers_thread_count(tmp_path):
    adata = make_counts(n_cells=120, seed=2)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    found = torch.get_num_threads()
    wanted = 1 if found != 1 else 2
    try:
        api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m",
                      config={**FAST, "num_threads": wanted})
        assert torch.get_num_threads() == found
        api.scnym_api(adata, "predict", trained_model=tmp_path / "m", config={"num_threads": wanted})
        assert torch.get_num_threads() == found
        assert adata.obs["scNym"].notna().all()
    finally:
        torch.set_num_threads(found)


def test_streamed_prediction_leaves_the_callers_thread_count_between_blocks(tmp_path):
    """Two blocks are predicted at once on CPU, each on half the threads: the halving is the worker threads'
    own, so the thread consuming the stream keeps its count while the generator waits between blocks."""
    from scnym_cli.config import Config
    from scnym_cli.data.readers import cells_from_anndata
    from scnym_cli.data.stream import InMemoryChunks
    from scnym_cli.workflows.predictor import Predictor, iterate_predictions, prediction_workers

    adata = make_counts(n_cells=120, seed=2)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    api.scnym_api(adata, "train", groupby="cell_type", out_path=tmp_path / "m", config=FAST)
    found = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = Config(model_path=str(tmp_path / "m"), prediction_chunk_size=16)
        predictor = Predictor(tmp_path / "m", config, torch.device("cpu"))
        assert prediction_workers(predictor.device) == 2
        source = InMemoryChunks(cells_from_anndata(adata))
        predictor.prepare(source.genes, source)
        blocks = 0
        for block in iterate_predictions(predictor, source, config, with_embedding=False):
            assert torch.get_num_threads() == 2     # suspended between blocks: the caller's count
            blocks += 1
            assert len(block.obs) == len(block.result.labels)
        assert blocks == 8 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(found)
