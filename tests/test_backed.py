"""Training from disk (--backed): same data as in memory, same model when the window holds every
block, bounded memory on a file larger than the cap."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scnym_cli.config import Config
from scnym_cli.data.disk import DiskMatrix
from scnym_cli.data.matrix import RowMatrix, content_digest, dense_rows, row_blocks
from scnym_cli.data.stacked import StackedRows
from scnym_cli.workflows.inputs import load_training_inputs

from conftest import FAST_FLAGS, invoke, make_counts, write_h5ad


def shards(tmp_path, adata, n):
    directory = tmp_path / "shards"
    directory.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(adata.n_obs), n)):
        adata[rows].copy().write_h5ad(directory / f"part{k}.h5ad")
    return directory


def test_disk_rows_equal_memory_rows(tmp_path, monkeypatch):
    import scnym_cli.workflows.inputs as inputs_module

    monkeypatch.setattr(inputs_module, "BLOCK_ROWS", 37)    # many small blocks
    adata = make_counts(n_cells=300, seed=2)
    adata.var_names = [*adata.var_names[:-1], adata.var_names[0]]   # a duplicated gene
    path = write_h5ad(adata, tmp_path / "x.h5ad")
    target = make_counts(n_cells=90, seed=3)
    target.obs_names = [f"t{i}" for i in range(90)]
    config = Config(input_counts=path, lower_group="cell_type", unlabeled_counts=write_h5ad(target, tmp_path / "t.h5ad"))
    memory = load_training_inputs(config)
    for source in (path, shards(tmp_path, adata, 3)):
        disk = load_training_inputs(config.replace(backed=True, input_counts=str(source)))
        assert list(disk.cells.genes) == list(memory.cells.genes)
        assert (disk.labels == memory.labels).all() and (disk.domains == memory.domains).all()
        rows = np.array([389, 0, 36, 37, 299, 300, 150])
        np.testing.assert_allclose(disk.cells.X[rows].toarray(), memory.cells.X[rows].toarray(), rtol=1e-6)
        assert content_digest(disk.cells.X) == content_digest(memory.cells.X)
        # one protocol: the stacked matrix in memory and the one on disk answer rows and blocks alike
        assert isinstance(memory.cells.X, StackedRows) and isinstance(disk.cells.X, DiskMatrix)
        for X in (memory.cells.X, disk.cells.X):
            assert isinstance(X, RowMatrix)
            whole = sp.vstack(list(row_blocks(X)), format="csr")
            np.testing.assert_allclose(whole[rows].toarray(), dense_rows(X, rows), rtol=1e-6)
            assert content_digest(whole) == content_digest(X)
            np.testing.assert_allclose(X[10:20].toarray(), whole[10:20].toarray(), rtol=1e-6)


def test_backed_training_with_a_window_over_everything_matches_memory(runner, tmp_path):
    path = write_h5ad(make_counts(n_cells=200, seed=4), tmp_path / "x.h5ad")
    runs = {}
    for name, extra in (("memory", []), ("disk", ["--backed", "true"])):
        result = invoke(runner, "train_tissue_independent", "--input_counts", path, "--lower_group", "cell_type",
                        "--out_path", tmp_path / name, *FAST_FLAGS, *extra)
        assert result.exit_code == 0, result.output
        runs[name] = tmp_path / name
    pd.testing.assert_frame_equal(pd.read_csv(runs["memory"] / "fold_eval_acc.csv"),
                                  pd.read_csv(runs["disk"] / "fold_eval_acc.csv"))
    manifests = [json.loads((runs[n] / "all_data" / "model.json").read_text()) for n in runs]
    assert manifests[0]["data_fingerprint"]["sha256"] == manifests[1]["data_fingerprint"]["sha256"]
    assert manifests[0]["weights_sha256"] == manifests[1]["weights_sha256"]


def test_block_windows_cover_every_row_each_epoch():
    from scnym_cli.data.disk import BlockShuffleSampler

    class Blocks:  # a stand-in DiskMatrix: 10 blocks of 25 rows
        block_rows = 25

        def __init__(self):
            self.announced = set()   # blocks named to read_ahead

        def block_of(self, rows):
            return np.asarray(rows) // 25

        def read_ahead(self, blocks):
            self.announced.update(int(b) for b in blocks)

    rows = np.arange(0, 250, 2)
    matrix = Blocks()
    sampler = BlockShuffleSampler(rows, 10, matrix, window_blocks=3, seed=0, drop_last=False)
    epochs = []
    for _ in range(2):
        batches = []
        for batch in sampler.epoch():
            # every block a batch reads was named for reading ahead before the batch came
            assert set((batch // 25).tolist()) <= matrix.announced
            batches.append(batch)
        epochs.append(np.concatenate(batches))
        matrix.announced.clear()
    for drawn in epochs:
        assert sorted(drawn) == sorted(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    first = next(sampler.epoch())
    assert len(np.unique(first // 25)) <= 4   # a batch comes from one window (+ a carried remainder)


def write_in_blocks(path, n_cells, n_genes, nnz_per_cell, block=50_000):
    """A large counts h5ad written block by block (the test never holds the whole matrix)."""
    import anndata.io
    import h5py

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"label": np.array(["a", "b", "c"])[np.arange(n_cells) % 3]},
                       index=[f"c{i}" for i in range(n_cells)])
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
        matrix = None
        for start in range(0, n_cells, block):
            n = min(block, n_cells - start)
            columns = np.sort(rng.choice(n_genes - 3, size=(n, nnz_per_cell), replace=True) + 3, axis=1)
            marker = (np.arange(start, start + n) % 3)[:, None]          # a planted marker per class
            columns = np.concatenate([marker, columns], axis=1)
            values = rng.integers(1, 6, size=columns.shape).astype(np.float32)
            values[:, 0] = 30
            X = sp.csr_matrix((values.ravel(), columns.ravel(), np.arange(0, n * (nnz_per_cell + 1) + 1,
                                                                          nnz_per_cell + 1)),
                              shape=(n, n_genes))
            X.sum_duplicates()
            if matrix is None:
                anndata.io.write_elem(f, "X", X, dataset_kwargs={"chunks": True})
                matrix = anndata.io.sparse_dataset(f["X"])
            else:
                matrix.append(X)
    return path


def peak_rss_mb(*args):
    """Peak resident memory of the command, measured by /usr/bin/time around its own process."""
    if not os.path.exists("/usr/bin/time"):
        pytest.skip("/usr/bin/time is needed to measure the peak memory of a process")
    result = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", sys.executable, "-m", "scnym_cli", *map(str, args)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stderr.split("PEAK_KB")[-1].split()[0]) / 1024


@pytest.mark.slow
def test_backed_training_of_a_file_larger_than_the_memory_cap(tmp_path):
    cap_mb = 1024
    path = write_in_blocks(tmp_path / "big.h5ad", n_cells=700_000, n_genes=2000, nnz_per_cell=220)
    import h5py

    with h5py.File(path) as f:
        matrix_mb = sum(f["X"][k].size * f["X"][k].dtype.itemsize for k in ("data", "indices", "indptr")) / 2**20
    assert matrix_mb > cap_mb                   # the matrix alone would not fit under the cap
    peak = peak_rss_mb("train_tissue_independent", "--input_counts", path, "--lower_group", "label", "--n_folds", "0",
                       "--n_epochs", "1", "--min_epochs", "1", "--n_hidden", "32", "--num_threads", "1",
                       "--out_path", tmp_path / "disk", "--backed", "true", "--read_buffer_cells", "8192", "--quiet")
    assert peak < cap_mb, (peak, matrix_mb)
    summary = json.loads((tmp_path / "disk" / "run_summary.json").read_text())
    assert summary["n_cells"] == 700_000
    manifest = json.loads((tmp_path / "disk" / "all_data" / "model.json").read_text())
    assert manifest["training"]["model_selection_metrics"]["accuracy"] > 0.9   # the planted markers were learnt


class _Reader:
    """A stand-in h5ad reader: rows of a CSR matrix, one block failing when asked."""

    def __init__(self, X, fail_at=None):
        self.X, self.fail_at, self.source = X, fail_at, "stand-in"
        self.n_cells = X.shape[0]

    def read(self, start, stop):
        if self.fail_at is not None and start <= self.fail_at < stop:
            raise ValueError(f"row {self.fail_at} cannot be read")
        return self.X[start:stop].astype(np.float32)

    def close(self):
        pass


def test_blocks_read_ahead_in_the_background_are_the_blocks_read_when_asked():
    from scnym_cli.data.disk import DiskPart

    X = sp.random(300, 40, density=0.3, format="csr", random_state=0, data_rvs=lambda n: np.arange(1, n + 1) % 7 + 1)
    genes = pd.Index([f"g{i}" for i in range(40)])

    def matrix(read_ahead_blocks, fail_at=None):
        part = DiskPart(_Reader(X, fail_at), genes, "counts", 0)
        return DiskMatrix([part], genes, block_rows=50, cache_blocks=2, read_ahead_blocks=read_ahead_blocks)

    plain, ahead = matrix(0), matrix(3)
    ahead.read_ahead([4, 1, 2, 5])          # at most 3 on their way at once
    assert sorted(ahead._pending) == [1, 2, 4]
    for index in [4, 1, 2, 5, 0, 3]:
        assert (ahead.block(index) != plain.block(index)).nnz == 0
        ahead.read_ahead([b for b in (index + 1,) if b < 6])
    assert plain.blocks_read == ahead.blocks_read == 6
    # an error while reading ahead is raised when the block is asked for, not lost in the thread
    failing = matrix(2, fail_at=120)
    failing.read_ahead([2])
    with pytest.raises(ValueError, match="row 120"):
        failing.block(2)
    failing.close()
    ahead.close()
    assert ahead._reader is None


def test_in_background_keeps_order_raises_in_place_and_stops_with_its_consumer():
    import threading

    from scnym_cli.data.stream import in_background

    assert list(in_background(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise RuntimeError("block 3 is damaged")

    seen = []
    with pytest.raises(RuntimeError, match="block 3"):
        for item in in_background(failing()):
            seen.append(item)
    assert seen == [1, 2]
    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    for item in in_background(endless()):
        if item == 3:
            break
    assert len(made) <= 3 + 3     # the producer stopped a block or two ahead of the consumer
    assert not any(t.name == "scnym-read-ahead" for t in threading.enumerate())


def test_row_runs_densify_from_a_view_and_sparse_products_match_scipy():
    import warnings

    from scnym_cli.data.matrix import csr_rows, sparse_product

    X = sp.random(60, 40, density=0.3, format="csr", dtype=np.float32, random_state=0)
    for rows in (slice(0, 60), slice(7, 19), slice(59, 80), slice(30, 30)):
        np.testing.assert_array_equal(csr_rows(X, rows).toarray(), X[rows].toarray())
        np.testing.assert_array_equal(dense_rows(X, rows), X[rows].toarray())
    np.testing.assert_array_equal(dense_rows(X, np.array([5, 2, 5])), X[[5, 2, 5]].toarray())
    W = np.random.default_rng(0).random((40, 3), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # torch's beta note on sparse CSR tensors is not shown to users
        np.testing.assert_allclose(sparse_product(X, W), X @ W, rtol=1e-5)
    assert sparse_product(sp.csr_matrix((4, 40), dtype=np.float32), W).shape == (4, 3)
    gaps = X.tolil()
    gaps[[0, 31, 59]] = 0                 # cells without a value, the first and last among them
    gaps = gaps.tocsr()
    np.testing.assert_allclose(sparse_product(gaps, W), gaps @ W, rtol=1e-5, atol=1e-6)
