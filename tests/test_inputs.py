"""Inputs: every format gives the same model input; normalization; metadata; bad inputs."""

import gzip

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scnym_cli.config import Config
from scnym_cli.data import attach_metadata, normalize, read_expression, read_labels
from scnym_cli.data.normalize import AS_IS_MAX, detect_kind
from scnym_cli.errors import ScnymError
from scnym_cli.workflows.inputs import load_cells, load_training_inputs

from conftest import write_csv, write_h5ad, write_lines, write_loom, write_mtx


def expected_log_cpm(adata):
    dense = sp.csr_matrix(adata.X).toarray().astype(np.float64)
    return np.log1p(dense / dense.sum(1, keepdims=True) * 1e6)


@pytest.fixture
def every_format(tmp_path, counts_adata):
    genes_file = write_lines(tmp_path / "genes.txt", counts_adata.var_names)
    return counts_adata, {
        "h5ad": (write_h5ad(counts_adata, tmp_path / "x.h5ad"), None),
        "loom": (write_loom(counts_adata, tmp_path / "x.loom"), None),
        "csv_header_index": (write_csv(counts_adata, tmp_path / "a.csv"), None),
        "csv_header_only": (write_csv(counts_adata, tmp_path / "b.csv", index=False), None),
        "csv_no_header": (write_csv(counts_adata, tmp_path / "c.csv", header=False, index=False), genes_file),
        "csv_index_no_header": (write_csv(counts_adata, tmp_path / "d.csv", header=False), genes_file),
        "tsv": (write_csv(counts_adata, tmp_path / "e.tsv", sep="\t"), None),
        "mtx": (write_mtx(counts_adata, tmp_path / "mtx"), None),
    }


def test_every_format_gives_the_same_model_input(every_format):
    adata, paths = every_format
    expected = expected_log_cpm(adata)
    for name, (path, genes_file) in paths.items():
        config = Config(input_gene_names=genes_file)
        cells, kind = load_cells(config, path)
        assert kind == "counts", name
        assert sp.isspmatrix_csr(cells.X) and cells.X.dtype == np.float32, name
        assert list(cells.genes) == list(adata.var_names), name
        np.testing.assert_allclose(cells.X.toarray(), expected, rtol=1e-5, atol=1e-5, err_msg=name)
        if name not in ("csv_header_only", "csv_no_header"):
            assert list(cells.cell_ids) == list(adata.obs_names), name


def test_gzipped_csv(tmp_path, counts_adata):
    plain = write_csv(counts_adata, tmp_path / "x.csv")
    packed = tmp_path / "x.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert (read_expression(packed).X != read_expression(plain).X).nnz == 0


def test_labels_from_obs_loom_and_metadata_agree(tmp_path, counts_adata):
    from_h5ad = read_expression(write_h5ad(counts_adata, tmp_path / "x.h5ad"))
    from_loom = read_expression(write_loom(counts_adata, tmp_path / "x.loom"))
    truth = counts_adata.obs["cell_type"].astype(str).to_numpy()
    assert (read_labels(from_h5ad, "cell_type") == truth).all()
    assert (read_labels(from_loom, "cell_type") == truth).all()

    csv_cells = read_expression(write_csv(counts_adata, tmp_path / "x.csv"))
    positional = tmp_path / "positional.csv"
    counts_adata.obs.to_csv(positional, index=False)         # rows in cell order, no ids
    assert (read_labels(attach_metadata(csv_cells, positional), "cell_type") == truth).all()
    shuffled = tmp_path / "by_id.csv"
    counts_adata.obs.sample(frac=1.0, random_state=0).to_csv(shuffled)  # shuffled, with an id column
    assert (read_labels(attach_metadata(csv_cells, shuffled), "cell_type") == truth).all()


def test_metadata_with_wrong_rows_is_an_error(tmp_path, counts_adata):
    cells = read_expression(write_h5ad(counts_adata, tmp_path / "x.h5ad"))
    short = tmp_path / "short.csv"
    counts_adata.obs.iloc[:10].to_csv(short, index=False)
    with pytest.raises(ScnymError, match="10 rows but"):
        attach_metadata(cells, short)


@pytest.mark.parametrize("base,kind", [(np.e, "log1p"), (2.0, "log2_1p"), (10.0, "log10_1p")])
@pytest.mark.parametrize("total", [1e4, 1e6, 1502.8])
def test_log_normalized_input_at_any_scale_and_base_is_rescaled_to_cpm(counts_adata, base, kind, total):
    counts = sp.csr_matrix(counts_adata.X)
    from_counts, detected = normalize(counts, "auto")
    assert detected == "counts"
    logged = counts.multiply(total / counts.sum(1)).tocsr().astype(np.float32)
    logged.data = (np.log1p(logged.data) / np.log(base)).astype(np.float32)
    from_log, detected = normalize(logged, "auto")
    assert detected == kind
    np.testing.assert_allclose(from_log.toarray(), from_counts.toarray(), rtol=1e-4, atol=1e-4)
    declared, _ = normalize(logged, kind)
    np.testing.assert_allclose(declared.toarray(), from_counts.toarray(), rtol=1e-4, atol=1e-4)
    if logged.data.max() <= AS_IS_MAX:  # what could be ln(CPM+1) is trusted as it is
        as_is, detected = normalize(logged, "as_is")
        assert detected == "as_is" and (as_is != logged).nnz == 0 and as_is is not logged
    else:  # log2 / log10 of CPM reach beyond ln(1e6 + 1): not ln(CPM+1), whatever the user said
        with pytest.raises(ScnymError, match="as_is means the values are ln"):
            normalize(logged, "as_is")


def test_declared_normalizations_that_the_values_contradict_are_refused(counts_adata):
    """Counts declared log-normalized overflow or sit far above any log value; all-zero data has nothing."""
    counts = sp.csr_matrix(counts_adata.X, dtype=np.float32)
    big = counts.copy()
    big.data = big.data * 40 + 100
    with pytest.raises(ScnymError, match="integers up to .* these look like raw counts"):
        normalize(big, "log1p")
    small = counts.copy()
    small.data = np.minimum(small.data, 5)
    normalize(small, "log1p")                     # small integers: possible, a warning only
    later = sp.vstack([small, big], format="csr")   # first cells fine, later ones overflow when de-logged
    with pytest.raises(ScnymError, match="overflows"):
        normalize(later, "log1p", kind="log1p")
    with pytest.raises(ScnymError, match="no expression at all"):
        normalize(sp.csr_matrix(counts.shape, dtype=np.float32), "auto")


def test_log_base_of_a_gene_subset_defaults_to_natural_log(counts_adata):
    counts = sp.csr_matrix(counts_adata.X)
    logged = counts.multiply(1e4 / counts.sum(1)).tocsr().astype(np.float32)
    logged.data = np.log2(logged.data + 1).astype(np.float32)
    assert detect_kind(logged[:, :30]) == "log1p"   # cannot be told: natural log assumed (and logged)
    assert detect_kind(logged) == "log2_1p"


def test_normalize_does_not_touch_the_input_unless_asked(counts_adata):
    X = sp.csr_matrix(counts_adata.X)
    before = X.copy()
    normalize(X, "auto")
    assert (X != before).nnz == 0


def test_empty_cells_stay_zero(counts_adata):
    X = sp.csr_matrix(counts_adata.X).tolil()
    X[3, :] = 0
    out, _ = normalize(X.tocsr(), "auto")
    assert out[3].nnz == 0 and np.isfinite(out.data).all()


@pytest.mark.parametrize("change,fragment", [
    (lambda X: X.__setitem__((0, 0), np.nan), "NaN"),
    (lambda X: X.__setitem__((0, 0), np.inf), "infinite"),
    (lambda X: X.__setitem__((0, 0), -1.5), "negative"),
    (lambda X: X.__setitem__((0, 0), 1234.5), "not log-transformed"),
])
def test_bad_values_are_refused(counts_adata, change, fragment):
    X = sp.csr_matrix(counts_adata.X).tolil()
    change(X)
    with pytest.raises(ScnymError, match=fragment):
        detect_kind(X.tocsr())


def test_layers_and_raw(tmp_path, counts_adata):
    adata = counts_adata.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.random.default_rng(0).normal(size=adata.shape).astype(np.float32))  # scaled
    path = write_h5ad(adata, tmp_path / "x.h5ad")
    with pytest.raises(ScnymError, match="--input_layer raw"):
        load_cells(Config(), path)
    for layer in ("counts", "raw"):
        cells, kind = load_cells(Config(input_layer=layer), path)
        assert kind == "counts"
    with pytest.raises(ScnymError, match="layer 'absent' not in"):
        load_cells(Config(input_layer="absent"), path)


def test_gene_column_and_duplicate_genes(tmp_path, counts_adata):
    adata = counts_adata.copy()
    adata.var["symbol"] = ["dup"] * 2 + list(adata.var_names[2:])
    cells, _ = load_cells(Config(gene_column="symbol"), write_h5ad(adata, tmp_path / "x.h5ad"))
    assert list(cells.genes).count("dup") == 1 and len(cells.genes) == adata.n_vars - 1
    with pytest.raises(ScnymError, match="gene column 'nope'"):
        load_cells(Config(gene_column="nope"), tmp_path / "x.h5ad")


def test_genes_to_use_subsets_after_normalization(tmp_path, counts_adata):
    path = write_h5ad(counts_adata, tmp_path / "x.h5ad")
    keep = list(counts_adata.var_names[[5, 1, 9]])
    subset_file = write_lines(tmp_path / "use.txt", keep)
    inputs = load_training_inputs(Config(input_counts=path, lower_group="cell_type", genes_to_use=subset_file))
    assert list(inputs.cells.genes) == keep
    np.testing.assert_allclose(inputs.cells.X.toarray(), expected_log_cpm(counts_adata)[:, [5, 1, 9]], rtol=1e-5)
    write_lines(subset_file, keep + ["not_a_gene"])
    with pytest.raises(ScnymError, match="not_a_gene"):
        load_training_inputs(Config(input_counts=path, lower_group="cell_type", genes_to_use=subset_file))


def test_non_numeric_csv_cell(tmp_path, counts_adata):
    path = write_csv(counts_adata, tmp_path / "x.csv")
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[4] = "oops"
    lines[3] = ",".join(fields)
    path.write_text("\n".join(lines))
    with pytest.raises(ScnymError, match="non-numeric value 'oops'"):
        read_expression(path)


def test_unlabeled_cells_are_not_a_class(tmp_path, counts_adata):
    adata = counts_adata.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.iloc[:20, adata.obs.columns.get_loc("cell_type")] = "Unlabeled"
    inputs = load_training_inputs(Config(input_counts=write_h5ad(adata, tmp_path / "x.h5ad"),
                                         lower_group="cell_type"))
    assert "Unlabeled" not in inputs.encoding.classes
    assert (inputs.codes[:20] == -1).all() and (inputs.codes[20:] >= 0).all()


def test_row_scaling_in_value_blocks_matches_dense(monkeypatch):
    import importlib

    module = importlib.import_module("scnym_cli.data.normalize")
    monkeypatch.setattr(module, "VALUE_BLOCK", 7)   # blocks smaller than one row, rows spanning blocks
    X = sp.lil_matrix(sp.random(50, 30, density=0.3, format="csr", random_state=0, dtype=np.float32))
    X[4] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    factors = np.random.default_rng(0).random(50)
    scaled = X.copy()
    module._scale_rows(scaled, factors)
    np.testing.assert_allclose(scaled.toarray(), X.toarray() * factors[:, None].astype(np.float32), rtol=1e-6)


def test_one_normalization_policy_in_memory_from_disk_and_streamed(tmp_path, monkeypatch, runner):
    """The kind is decided on a dataset's first cells however it is read; a file whose later cells are not
    counts when its first are is refused on every path, not normalized as counts."""
    import importlib

    from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts

    for module in ("scnym_cli.data.normalize", "scnym_cli.workflows.inputs"):
        monkeypatch.setattr(importlib.import_module(module), "DETECTION_ROWS", 50)
    adata = make_counts(n_cells=160, seed=8)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    mixed = X.copy()
    tail = mixed[100:].copy()
    tail.data = np.log1p(tail.data)
    mixed = sp.vstack([mixed[:100], tail], format="csr")
    with pytest.raises(ScnymError, match="first 50 cells hold integer counts but later cells do not"):
        normalize(mixed, "auto")
    normalize(mixed[:100], "auto")                       # counts throughout: fine
    normalize(mixed, "counts")                           # declared: the user says so
    adata.X = mixed
    path = write_h5ad(adata, tmp_path / "mixed.h5ad")
    for backed in ("false", "true"):
        result = invoke(runner, "train_tissue_independent", "--input_counts", path, "--lower_group", "cell_type",
                        "--out_path", tmp_path / f"run_{backed}", "--backed", backed, *FAST_FLAGS)
        assert_one_line_error(result, "hold integer counts but later cells do not")
    clean = make_counts(n_cells=160, seed=8)
    good = write_h5ad(clean, tmp_path / "clean.h5ad")
    result = invoke(runner, "train_tissue_independent", "--input_counts", good, "--lower_group", "cell_type",
                    "--out_path", tmp_path / "model", *FAST_FLAGS, "--n_folds", "0")
    assert result.exit_code == 0, result.output
    result = invoke(runner, "predict_cell_types", "--model_path", tmp_path / "model", "--input_counts", path,
                    "--out_path", tmp_path / "predicted", "--prediction_chunk_size", "30")
    assert_one_line_error(result, "hold integer counts but later cells do not")
    assert not (tmp_path / "predicted").exists()


def test_per_cell_strings_share_one_string_per_value_and_missing_values_are_found():
    from scnym_cli.data.labels import LabelEncoding, missing_values, per_cell_strings

    values = pd.Series(pd.Categorical([" B", "A", " B", "A"]))
    strings = per_cell_strings(values)
    assert list(strings) == ["B", "A", "B", "A"] and strings.dtype == object
    assert strings[0] is strings[2]                      # one str object per distinct value
    assert list(per_cell_strings(pd.Series([" x", 1, 1.5]), strip=False)) == [" x", "1", "1.5"]
    assert list(missing_values(pd.Series(["a", None, " ", np.nan, "b"]))) == [False, True, True, True, False]
    assert list(missing_values(pd.Series([np.nan, np.nan]))) == [True, True]
    assert len(missing_values(pd.Series([], dtype=object))) == 0
    codes = LabelEncoding(("A", "B")).encode(np.array(["B", "Unlabeled", "A", "C"], dtype=object))
    assert list(codes) == [1, -1, 0, -1] and codes.dtype == np.int64
