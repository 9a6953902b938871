"""Every bad input of SPEC section 3 (and friends) through the CLI: a one-line error naming the
problem, a non-zero exit, no traceback, and no output directory left behind."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_csv, write_h5ad, write_lines


def _modified(tmp_path, change):
    adata = make_counts(n_cells=60)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    change(adata)
    return write_h5ad(adata, tmp_path / "bad.h5ad")


def _set_value(value):
    def change(adata):
        X = adata.X.tolil()
        X[0, 0] = value
        adata.X = X.tocsr()
    return change


def _scaled(adata):
    dense = adata.X.toarray()
    adata.X = sp.csr_matrix((dense - dense.mean(0)) / (dense.std(0) + 1))


def _linear_cpm(adata):
    dense = adata.X.toarray()
    adata.X = sp.csr_matrix(dense / dense.sum(1, keepdims=True) * 1e6)


def _one_class(adata):
    adata.obs["cell_type"] = "type_0"


def _missing_labels(adata):
    adata.obs.iloc[:5, adata.obs.columns.get_loc("cell_type")] = np.nan


CASES = {
    "nan values": (lambda t: _modified(t, _set_value(np.nan)), [], ["NaN"]),
    "infinite values": (lambda t: _modified(t, _set_value(np.inf)), [], ["infinite"]),
    "negative / scaled values": (lambda t: _modified(t, _scaled), [], ["negative", "scaled"]),
    "linear CPM without log": (lambda t: _modified(t, _linear_cpm), [], ["not log-transformed"]),
    "single class": (lambda t: _modified(t, _one_class), [], ["at least 2 classes", "only 'type_0'"]),
    "missing labels": (lambda t: _modified(t, _missing_labels), [], ["5 cells have no value", "Unlabeled"]),
    "missing label column": (lambda t: _modified(t, lambda a: None), ["--lower_group", "celltype"],
                             ["'celltype' is not in", "did you mean 'cell_type'"]),
    "missing input file": (lambda t: t / "absent.h5ad", [], ["does not exist"]),
    "unsupported format": (lambda t: write_lines(t / "x.xlsx", ["a"]), [], ["unsupported input format"]),
    "corrupt h5ad": (lambda t: write_lines(t / "x.h5ad", ["not hdf5"]), [], ["could not read", "h5ad"]),
    "truncated h5ad": (lambda t: _truncated(t), [], ["could not read"]),
    "corrupt loom": (lambda t: write_lines(t / "x.loom", ["not hdf5"]), [], ["could not read", "loom"]),
    "csv without gene names": (lambda t: write_csv(make_counts(n_cells=20), t / "x.csv", header=False), [],
                               ["no gene names", "--input_gene_names"]),
    "gene names of the wrong length": (lambda t: write_csv(make_counts(n_cells=20), t / "x.csv", header=False),
                                       ["--input_gene_names", "GENES3"], ["has 3 names", "60 genes"]),
    "metadata with wrong row count": (lambda t: write_csv(make_counts(n_cells=20), t / "x.csv", index=False),
                                      ["--training_metadata", "META10"], ["10 rows", "20 cells"]),
    "empty csv": (lambda t: write_lines(t / "x.csv", [""]), [], ["empty"]),
    "genes_to_use not in data": (lambda t: write_h5ad(make_counts(n_cells=20), t / "x.h5ad"),
                                 ["--genes_to_use", "GENES3"], ["3 of 3 genes in --genes_to_use"]),
    "missing layer": (lambda t: write_h5ad(make_counts(n_cells=20), t / "x.h5ad"), ["--input_layer", "counts"],
                      ["layer 'counts' not in"]),
    "too many folds": (lambda t: write_h5ad(make_counts(n_cells=12), t / "x.h5ad"), ["--n_folds", "7"],
                       ["too few", "--n_folds"]),
    "unknown config key": (lambda t: write_h5ad(make_counts(n_cells=20), t / "x.h5ad"), ["-c", "BADCONFIG"],
                           ["unknown config key 'batchsize'", "did you mean 'batch_size'"]),
    "bad config value": (lambda t: write_h5ad(make_counts(n_cells=20), t / "x.h5ad"), ["--lr", "fast"],
                         ["'lr'", "expected a number"]),
    "missing config file": (lambda t: write_h5ad(make_counts(n_cells=20), t / "x.h5ad"), ["-c", "nothere.yaml"],
                            ["config file", "does not exist"]),
    "cuda requested without a GPU": (lambda t: write_h5ad(make_counts(n_cells=20), t / "x.h5ad"),
                                     ["--device", "cuda:0"], ["no CUDA GPU"]),
    # silently wrong before (issue 13): now each stops with the cause and the fix
    "counts declared log-normalized": (lambda t: _modified(t, lambda a: None), ["--input_normalization", "log1p"],
                                       ["integers up to", "look like raw counts", "--input_normalization counts"]),
    "log2 data declared as_is": (lambda t: _modified(t, _log2_cpm), ["--input_normalization", "as_is"],
                                 ["as_is means the values are ln(CPM+1)", "reach"]),
    "all-zero matrix": (lambda t: _modified(t, _all_zero), [], ["no expression at all"]),
    "duplicated cell ids": (lambda t: _modified(t, _duplicate_ids), [], ["cell ids given more than once",
                                                                          "obs_names_make_unique"]),
    "out_path under a file": (lambda t: _modified(t, lambda a: None), ["--out_path", "FILE/run"],
                              ["cannot be created", "is a file, not a folder"]),
}


def _log2_cpm(adata):
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X = X.multiply(1e6 / X.sum(1)).tocsr().astype(np.float32)
    X.data = np.log2(X.data + 1).astype(np.float32)
    adata.X = X


def _all_zero(adata):
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)


def _duplicate_ids(adata):
    adata.obs_names = [f"cell{i // 2}" for i in range(adata.n_obs)]


def _truncated(tmp_path):
    path = write_h5ad(make_counts(n_cells=60), tmp_path / "full.h5ad")
    cut = tmp_path / "x.h5ad"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


@pytest.mark.parametrize("case", list(CASES))
def test_bad_training_input(runner, tmp_path, case):
    import torch

    if case == "cuda requested without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_input, extra, fragments = CASES[case]
    data = make_input(tmp_path)
    replacements = {
        "GENES3": str(write_lines(tmp_path / "genes3.txt", ["a", "b", "c"])),
        "META10": str(_meta(tmp_path, 10)),
        "BADCONFIG": str(write_lines(tmp_path / "bad.txt", ["batchsize: 12"])),
        "FILE/run": str(write_lines(tmp_path / "a_file", ["x"]) / "run"),
    }
    extra = [replacements.get(e, e) for e in extra]
    out = tmp_path / "out"
    args = ["train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type", "--out_path", out,
            *FAST_FLAGS, *extra]
    if "--n_folds" in extra:  # the later flag wins; keep FAST_FLAGS' n_folds out of the way
        index = args.index("--n_folds")
        del args[index:index + 2]
    result = invoke(runner, *args)
    assert_one_line_error(result, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def _meta(tmp_path, n):
    path = tmp_path / "meta.csv"
    pd.DataFrame({"cell_type": ["type_0", "type_1"] * (n // 2)}).to_csv(path, index=False)
    return path


def test_bad_prediction_input(runner, trained_run, tmp_path):
    data = _modified(tmp_path, _scaled)
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                    "--out_path", tmp_path / "p")
    assert_one_line_error(result, "negative")
    assert not (tmp_path / "p").exists()


def test_prediction_needs_a_model(runner, tmp_path):
    data = write_h5ad(make_counts(n_cells=20), tmp_path / "x.h5ad")
    result = invoke(runner, "predict_cell_types", "--input_counts", data, "--out_path", tmp_path / "p")
    assert_one_line_error(result, "needs --model_path")


@pytest.mark.parametrize("case", ["duplicated cell ids", "counts declared log-normalized", "all-zero matrix",
                                  "out_path under a file"])
def test_bad_prediction_inputs_that_were_silently_wrong(runner, trained_run, tmp_path, case):
    make_input, extra, fragments = CASES[case]
    data = make_input(tmp_path)
    out = tmp_path / "p"
    extra = [str(write_lines(tmp_path / "a_file", ["x"]) / "run") if e == "FILE/run" else e for e in extra]
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                    "--out_path", out, *extra)
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_gene_names_that_contradict_the_file_and_target_files_without_cells_or_names(runner, tmp_path):
    adata = make_counts(n_cells=60)
    data = write_csv(adata, tmp_path / "x.csv")                      # a header names the genes
    shuffled = write_lines(tmp_path / "genes.txt", list(adata.var_names[::-1]))
    common = ["--lower_group", "cell_type", "--training_metadata", str(_meta(tmp_path, 60)), *FAST_FLAGS]
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--input_gene_names", shuffled,
                    "--out_path", tmp_path / "a", *common)
    assert_one_line_error(result, "names its genes and --input_gene_names names them otherwise", "column 1")
    reference = write_h5ad(adata, tmp_path / "ref.h5ad")
    nameless = write_csv(make_counts(n_cells=30, seed=3), tmp_path / "target.csv", header=False)
    result = invoke(runner, "train_tissue_independent", "--input_counts", reference, "--lower_group", "cell_type",
                    "--unlabeled_counts", nameless, "--out_path", tmp_path / "b", *FAST_FLAGS)
    assert_one_line_error(result, "no gene names", "--unlabeled_genes")
    empty = write_h5ad(make_counts(n_cells=30, seed=3)[:0].copy(), tmp_path / "empty.h5ad")
    for backed in ("false", "true"):
        result = invoke(runner, "train_tissue_independent", "--input_counts", reference, "--lower_group",
                        "cell_type", "--unlabeled_counts", empty, "--out_path", tmp_path / f"c{backed}",
                        "--backed", backed, *FAST_FLAGS)
        assert_one_line_error(result, "holds no cells", "nothing to adapt to")
    assert not [p for p in tmp_path.iterdir() if p.name in ("a", "b", "cfalse", "ctrue")]


def test_a_misspelt_label_column_at_prediction_is_named(runner, trained_run, tmp_path):
    data = write_h5ad(make_counts(n_cells=40, seed=5), tmp_path / "q.h5ad")
    result = invoke(runner, "predict_cell_types", "--model_path", trained_run, "--input_counts", data,
                    "--out_path", tmp_path / "p", "--lower_group", "celltype")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "no column 'celltype' (--lower_group)" in text and "did you mean 'cell_type'?" in text
