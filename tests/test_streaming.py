"""Prediction streams h5ad files block by block: same results as in memory, bounded memory."""

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import invoke, make_counts, write_h5ad


def predict(runner, model, data, out, *args):
    result = invoke(runner, "predict_cell_types", "--model_path", model, "--input_counts", data, "--out_path", out,
                    *args)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "predictions.csv")


def test_block_size_does_not_change_predictions(runner, trained_run, tmp_path):
    data = write_h5ad(make_counts(n_cells=101, seed=8), tmp_path / "q.h5ad")
    whole = predict(runner, trained_run, data, tmp_path / "a")
    blocks = predict(runner, trained_run, data, tmp_path / "b", "--prediction_chunk_size", "7")
    pd.testing.assert_frame_equal(whole, blocks, rtol=1e-5)
    csv = tmp_path / "q.csv"
    ad.read_h5ad(data).to_df().to_csv(csv)
    pd.testing.assert_frame_equal(whole, predict(runner, trained_run, csv, tmp_path / "c",
                                                 "--prediction_chunk_size", "10"), rtol=1e-5)


@pytest.mark.parametrize("storage", ["csc", "dense", "layer"])
def test_every_h5ad_storage_streams(runner, trained_run, tmp_path, storage):
    adata = make_counts(n_cells=60, seed=8)
    reference = predict(runner, trained_run, write_h5ad(adata, tmp_path / "r.h5ad"), tmp_path / "r")
    args = []
    if storage == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif storage == "dense":
        adata.X = adata.X.toarray()
    else:
        adata.layers["counts"] = adata.X.copy()
        adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
        args = ["--input_layer", "counts"]
    table = predict(runner, trained_run, write_h5ad(adata, tmp_path / "x.h5ad"), tmp_path / "p",
                    "--prediction_chunk_size", "16", *args)
    pd.testing.assert_frame_equal(reference, table, rtol=1e-5)


def test_annotated_h5ad_written_in_place_keeps_everything_else(runner, trained_run, tmp_path):
    adata = make_counts(n_cells=50, seed=4)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    adata.uns["note"] = "kept"
    table = predict(runner, trained_run, write_h5ad(adata, tmp_path / "q.h5ad"), tmp_path / "p",
                    "--prediction_chunk_size", "8")
    annotated = ad.read_h5ad(tmp_path / "p" / "annotated.h5ad")
    assert (annotated.X != adata.X).nnz == 0 and annotated.uns["note"] == "kept"
    np.testing.assert_array_equal(annotated.obsm["X_umap"], adata.obsm["X_umap"])
    assert (annotated.obs["scNym"].astype(str).to_numpy() == table["predicted_label"].to_numpy()).all()
    np.testing.assert_allclose(annotated.obsm["scNym_probabilities"], table.filter(like="prob_").to_numpy(),
                               rtol=1e-5, atol=1e-30)   # CSV rounds float32 subnormals
    assert list(annotated.uns["scNym_classes"]) == ["type_0", "type_1", "type_2"]
    assert list(annotated.obs["cell_type"]) == list(adata.obs["cell_type"])


def test_streaming_memory_is_bounded_by_the_block(runner, trained_run, tmp_path):
    rng = np.random.default_rng(0)
    n_cells, n_genes = 20_000, 1000          # the model's 60 genes and 940 it ignores
    X = sp.random(n_cells, n_genes, density=0.5, format="csr", random_state=0, dtype=np.float32)
    X.data = rng.poisson(3, size=X.nnz).astype(np.float32) + 1
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"gene{j:03d}" for j in range(n_genes)]))
    data = write_h5ad(adata, tmp_path / "big.h5ad")
    matrix_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    del adata, X
    peaks = {}
    for block in (400, 2000):
        tracemalloc.start()
        predict(runner, trained_run, data, tmp_path / f"p{block}", "--prediction_chunk_size", str(block),
                "--write_h5ad", "false")
        peaks[block] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # memory follows the block (a few copies of one block's arrays: the one predicted, the next read ahead), never
    # the 80 MB matrix
    assert peaks[400] < peaks[2000] / 2, peaks
    assert peaks[400] < matrix_bytes / 4, (peaks, matrix_bytes)


def test_prediction_from_a_folder_of_shards(runner, trained_run, tmp_path):
    adata = make_counts(n_cells=70, seed=8)
    whole = predict(runner, trained_run, write_h5ad(adata, tmp_path / "q.h5ad"), tmp_path / "a")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(70), 3)):
        adata[rows].copy().write_h5ad(shards / f"part{k}.h5ad")
    table = predict(runner, trained_run, shards, tmp_path / "b", "--prediction_chunk_size", "9")
    pd.testing.assert_frame_equal(whole, table, rtol=1e-5)
    assert not (tmp_path / "b" / "annotated.h5ad").exists()
    other = adata[:10, :50].copy()
    other.write_h5ad(shards / "part9.h5ad")
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", shards, "--out_path",
                    tmp_path / "c")
    assert result.exit_code != 0 and "other genes" in result.stderr


def test_forward_passes_hold_one_dense_chunk_at_a_time():
    """Evaluation of large data densifies one chunk; the previous chunk is freed first."""
    import torch

    from scnym_cli.nn import CellTypeClassifier
    from scnym_cli.train.inference import forward_rows

    n_cells, n_genes, chunk = 6000, 2000, 2000
    X = sp.random(n_cells, n_genes, density=0.01, format="csr", random_state=0, dtype=np.float32)
    model = CellTypeClassifier(n_genes=n_genes, n_classes=3, n_hidden=8, n_layers=1)
    chunk_bytes = chunk * n_genes * 4
    tracemalloc.start()
    outputs = forward_rows(model, X, None, torch.device("cpu"), chunk_size=chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert outputs.logits.shape == (n_cells, 3)
    assert peak < 1.5 * chunk_bytes, (peak, chunk_bytes)


def test_freed_memory_is_given_back_where_the_c_library_can(monkeypatch):
    """release_freed_memory calls glibc's malloc_trim(0) (here, on Linux) and is a no-op where there is none."""
    from scnym_cli import memory

    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    memory.release_freed_memory()
    assert calls == [0]
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    memory.release_freed_memory()              # nothing to call: nothing happens
    monkeypatch.undo()
    memory.release_freed_memory()              # the real call runs without error on this machine


def test_a_sample_of_cells_is_runs_of_rows_read_without_a_pass(tmp_path):
    from scnym_cli.data.stream import SAMPLE_RUNS, H5adChunks, ShardedH5adChunks, sample_cells

    adata = make_counts(n_cells=1000, seed=3)
    X = sp.csr_matrix(adata.X)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(1000), 3)):
        adata[rows].copy().write_h5ad(shards / f"part{k}.h5ad")
    sharded = ShardedH5adChunks(shards)
    with H5adChunks(write_h5ad(adata, tmp_path / "q.h5ad")) as whole:
        rows, sample = sample_cells(whole, 300, seed=0)
        assert len(rows) == 300 and len(set(rows)) == 300 and np.all(np.diff(rows) > 0)
        assert len(np.flatnonzero(np.diff(rows) > 1)) < SAMPLE_RUNS      # runs of consecutive rows
        assert rows.max() > 700 and rows.min() < 300                      # across the whole file
        np.testing.assert_array_equal(sample.toarray(), X[rows].toarray())
        rows_again, from_shards = sample_cells(sharded, 300, seed=0)      # runs may span shards
        np.testing.assert_array_equal(rows_again, rows)
        np.testing.assert_array_equal(from_shards.toarray(), sample.toarray())
        assert not np.array_equal(sample_cells(whole, 300, seed=1)[0], rows)
        every, matrix = sample_cells(whole, 5000, seed=0)                 # a smaller source: all of it
        np.testing.assert_array_equal(every, np.arange(1000))
        np.testing.assert_array_equal(matrix.toarray(), X.toarray())
        # each run is transformed as it is read
        _, kept = sample_cells(whole, 300, seed=0, transform=lambda block: block[:, :5])
        np.testing.assert_array_equal(kept.toarray(), X[rows][:, :5].toarray())
    sharded.close()


@pytest.mark.parametrize("store", ["h5ad", "zarr2", "zarr3"])
def test_obs_is_read_as_anndata_reads_it_with_compact_ids(tmp_path, store, monkeypatch):
    from scnym_cli.data import stream

    monkeypatch.setattr(stream, "ID_SLICE", 7)   # ids read in several slices
    adata = make_counts(n_cells=30, seed=3)
    adata.obs_names = [f"cell-{i}-é" for i in range(adata.n_obs)]   # non-ASCII ids survive the slices
    adata.obs["depth"] = np.arange(adata.n_obs, dtype=np.float32)
    adata.obs["note"] = [f"n{i % 4}" for i in range(adata.n_obs)]
    adata.obs.index.name = "barcode"   # stored under its own key, not _index
    if store == "h5ad":
        path = write_h5ad(adata, tmp_path / "q.h5ad")
    else:
        path = tmp_path / "q.zarr"
        with ad.settings.override(zarr_write_format=int(store[-1])):
            adata.write_zarr(path)
    expected = ad.read_h5ad(path).obs if store == "h5ad" else ad.read_zarr(path).obs
    import anndata.io

    read_whole = []
    element_reader = anndata.io.read_elem
    monkeypatch.setattr(anndata.io, "read_elem", lambda element: (
        read_whole.append(element.name) if element.name.rstrip("/").endswith("obs") else None, element_reader(element))[1])
    group = stream.open_anndata_store(path)
    obs = stream.read_obs(group["obs"])
    assert read_whole == []   # column by column: the ids never pass through anndata's reader
    assert str(obs.index.dtype) == "string" and obs.index.tolist() == expected.index.tolist()
    assert list(obs.columns) == list(expected.columns)
    for column in expected.columns:
        np.testing.assert_array_equal(np.asarray(obs[column]), np.asarray(expected[column]))
        assert obs[column].dtype == expected[column].dtype


def test_duplicate_ids_are_found_across_slices_by_their_hashes(monkeypatch):
    from scnym_cli.data import readers
    from scnym_cli.errors import ScnymError

    monkeypatch.setattr(readers, "ID_SLICE", 5)
    ids = [f"c{i}" for i in range(40)]
    readers.require_unique_cell_ids(pd.Index(pd.array(ids, dtype="string[pyarrow]")), "q.h5ad")
    with pytest.raises(ScnymError, match=r"q.h5ad has 1 cell ids given more than once \(e.g. c3\)"):
        readers.require_unique_cell_ids(pd.Index(ids + ["c3"]), "q.h5ad")
    # ids whose hashes meet but that differ are not duplicates
    monkeypatch.setattr(readers.pd.util, "hash_array", lambda values, categorize: np.zeros(len(values), np.uint64))
    readers.require_unique_cell_ids(pd.Index(ids), "q.h5ad")
    with pytest.raises(ScnymError, match="2 cell ids given more than once"):
        readers.require_unique_cell_ids(pd.Index(ids + ["c9", "c1"]), "q.h5ad")


def test_obs_of_an_older_layout_is_read_whole_by_anndata(tmp_path):
    import h5py

    from scnym_cli.data import stream

    adata = make_counts(n_cells=12, seed=3)
    adata.obs = pd.DataFrame({"depth": np.arange(12, dtype=np.float32)}, index=[f"c{i}" for i in range(12)])
    path = write_h5ad(adata, tmp_path / "q.h5ad")
    with h5py.File(path, "r+") as f:   # anndata 0.7's dataframe layout (no categorical columns to convert)
        f["obs"].attrs["encoding-version"] = "0.1.0"
    with h5py.File(path, "r") as f:
        obs = stream.read_obs(f["obs"])
    assert str(obs.index.dtype) == "string" and obs.index.tolist() == [f"c{i}" for i in range(12)]
    np.testing.assert_array_equal(obs["depth"].to_numpy(), np.arange(12, dtype=np.float32))


def _obs_for_runs(n_cells: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = pd.Categorical(rng.choice(["B", "T", "NK"], size=n_cells))
    labels[3] = np.nan                                              # a cell without a label
    return pd.DataFrame({"cell_type": labels, "depth": rng.random(n_cells).astype(np.float32),
                         "note": [f"n{i % 4}-é" for i in range(n_cells)],
                         "count": pd.array([None if i == 5 else i for i in range(n_cells)], dtype="Int64")},
                        index=[f"cell-{seed}-{i}-é" for i in range(n_cells)])


def _write_store(adata, path, store):
    if store == "h5ad":
        return write_h5ad(adata, path.with_suffix(".h5ad"))
    with ad.settings.override(zarr_write_format=int(store[-1])):
        adata.write_zarr(path.with_suffix(".zarr"))
    return path.with_suffix(".zarr")


@pytest.mark.parametrize("store", ["h5ad", "zarr2", "zarr3"])
def test_runs_of_stored_obs_are_the_whole_obs_sliced(tmp_path, store):
    """Prediction reads each block's ids and label column from the store: the same values as the whole obs,
    for categorical (with a missing label), numeric, string and nullable columns, within and across shards."""
    from scnym_cli.data import stream

    adata = make_counts(n_cells=30, seed=3)
    adata.obs = _obs_for_runs(30, seed=3)
    path = _write_store(adata, tmp_path / "q", store)
    group = stream.open_anndata_store(path)
    whole = stream.read_obs(group["obs"])
    runs = stream.StoredRuns(group["obs"])
    assert runs.n_cells == 30 and runs.columns == ["cell_type", "depth", "note", "count"]

    def assert_runs_match(runs, frame):
        for start, stop in [(0, 7), (7, 19), (25, 30), (12, 12)]:
            assert runs.ids(start, stop).tolist() == frame.index[start:stop].tolist()
            for column in frame.columns:
                pd.testing.assert_series_equal(runs.column(column, start, stop).reset_index(drop=True),
                                               frame[column].iloc[start:stop].reset_index(drop=True),
                                               check_names=False, check_dtype=False, check_index_type=False)
        decoded = [v.decode() if isinstance(v, bytes) else v for piece in runs.id_slices() for v in piece]
        assert decoded == frame.index.tolist()

    assert_runs_match(runs, whole)
    # two shards, the second without the 'note' column: its cells read as missing there, as pandas joins them
    other = make_counts(n_cells=12, seed=4)
    other.obs = _obs_for_runs(12, seed=4).drop(columns="note")
    second = stream.open_anndata_store(_write_store(other, tmp_path / "r", store))
    shards = stream.ShardRuns([(30, runs), (12, stream.StoredRuns(second["obs"]))])
    joined = pd.concat([whole, stream.read_obs(second["obs"])], axis=0, join="outer")
    assert shards.n_cells == 42 and shards.columns == ["cell_type", "depth", "note", "count"]
    for start, stop in [(25, 35), (30, 42), (0, 42)]:
        assert shards.ids(start, stop).tolist() == joined.index[start:stop].tolist()
        notes = shards.column("note", start, stop)
        assert notes.isna().tolist() == joined["note"].iloc[start:stop].isna().tolist()
        assert shards.column("cell_type", start, stop).astype(str).tolist() == \
            joined["cell_type"].iloc[start:stop].astype(str).tolist()


def test_a_streamed_query_keeps_its_metadata_in_the_store(runner, trained_run, tmp_path, monkeypatch):
    """A labeled h5ad query predicted with sets and an annotated copy never reads its whole obs: ids and labels
    come block by block, the annotated copy's columns are written block by block beside the obs it had."""
    from scnym_cli.data import stream
    from scnym_cli.workflows import predict as predict_module

    adata = make_counts(n_cells=70, seed=5)
    adata.obs["note"] = "kept"
    data = write_h5ad(adata, tmp_path / "q.h5ad")
    for module in (stream, predict_module):
        monkeypatch.setattr(module, "read_obs", lambda group: pytest.fail("the whole obs was read"))
    table = predict(runner, trained_run, data, tmp_path / "p", "--prediction_chunk_size", "16",
                    "--lower_group", "cell_type", "--coverage", "0.9")
    monkeypatch.undo()
    assert table["cell_id"].tolist() == adata.obs_names.tolist()
    per_class = pd.read_csv(tmp_path / "p" / "per_class_metrics.csv")
    assert per_class["support"].sum() == 70
    annotated = ad.read_h5ad(tmp_path / "p" / "annotated.h5ad")
    obs = annotated.obs
    assert obs.index.tolist() == adata.obs_names.tolist()
    assert list(obs.columns) == [*adata.obs.columns, "scNym", "scNym_prediction_set", "scNym_confidence",
                                 "scNym_novelty", "scNym_disagreement", "scNym_set_size"]
    assert (obs["cell_type"] == adata.obs["cell_type"]).all() and (obs["note"] == "kept").all()
    assert isinstance(obs["scNym"].dtype, pd.CategoricalDtype)
    assert list(obs["scNym"].cat.categories) == sorted(table["predicted_label"].unique())   # only those used
    assert obs["scNym"].astype(str).tolist() == table["predicted_label"].tolist()
    assert list(obs["scNym_prediction_set"].cat.categories) == sorted(table["prediction_set"].unique())
    assert obs["scNym_prediction_set"].astype(str).tolist() == table["prediction_set"].tolist()
    np.testing.assert_array_equal(obs["scNym_set_size"], table["set_size"])
    np.testing.assert_allclose(obs["scNym_confidence"], table["confidence"], rtol=1e-6)
    np.testing.assert_allclose(obs["scNym_novelty"], table["novelty"], rtol=1e-5)
    # predicting the annotated copy again replaces its prediction columns, each once
    again = predict(runner, trained_run, tmp_path / "p" / "annotated.h5ad", tmp_path / "p2")
    twice = ad.read_h5ad(tmp_path / "p2" / "annotated.h5ad").obs
    assert list(twice.columns) == [*adata.obs.columns, "scNym_prediction_set", "scNym_set_size", "scNym",
                                   "scNym_confidence", "scNym_novelty", "scNym_disagreement"]
    assert twice["scNym"].astype(str).tolist() == again["predicted_label"].tolist()


def test_an_older_obs_layout_is_annotated_in_todays(runner, trained_run, tmp_path):
    import h5py

    adata = make_counts(n_cells=40, seed=6)
    adata.obs = pd.DataFrame({"depth": np.arange(40, dtype=np.float32)}, index=[f"c{i}" for i in range(40)])
    data = write_h5ad(adata, tmp_path / "q.h5ad")
    with h5py.File(data, "r+") as f:   # anndata 0.7's dataframe layout
        f["obs"].attrs["encoding-version"] = "0.1.0"
    table = predict(runner, trained_run, data, tmp_path / "p")
    obs = ad.read_h5ad(tmp_path / "p" / "annotated.h5ad").obs
    assert obs.index.tolist() == [f"c{i}" for i in range(40)]
    np.testing.assert_array_equal(obs["depth"], np.arange(40, dtype=np.float32))
    assert obs["scNym"].astype(str).tolist() == table["predicted_label"].tolist()


def test_an_id_in_two_shards_is_a_clear_error(runner, trained_run, tmp_path):
    from conftest import assert_one_line_error

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        part = make_counts(n_cells=20, seed=k)
        part.obs_names = [f"c{k * 19 + i}" for i in range(20)]   # c19 in both
        part.write_h5ad(shards / f"part{k}.h5ad")
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", shards,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "1 cell ids given more than once (e.g. c19)")
    assert not (tmp_path / "p" / "predictions.csv").exists()
