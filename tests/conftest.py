"""Shared fixtures: tiny synthetic data with planted markers, writers for every input format,
a CLI runner, and access to the real datasets in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from typer.testing import CliRunner

from scnym_cli.cli import app

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Small, fast training settings for the CLI (seconds per run on 2 CPU cores).
FAST_FLAGS = ["--n_epochs", "4", "--min_epochs", "1", "--n_folds", "2", "--batch_size", "32",
              "--n_hidden", "32", "--patience", "0", "--num_threads", "1"]


def make_counts(n_cells: int = 240, n_genes: int = 60, n_classes: int = 3, seed: int = 0,
                markers_per_class: int = 5) -> ad.AnnData:
    """Poisson counts; class k over-expresses genes [k*m, (k+1)*m) ten-fold (the planted markers)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % n_classes
    rate = rng.gamma(2.0, 0.5, size=n_genes)
    rates = np.tile(rate, (n_cells, 1))
    for k in range(n_classes):
        rates[labels == k, k * markers_per_class:(k + 1) * markers_per_class] *= 10
    depth = rng.uniform(0.5, 2.0, size=(n_cells, 1))
    counts = rng.poisson(rates * depth).astype(np.float32)
    obs = pd.DataFrame({
        "cell_type": pd.Categorical([f"type_{k}" for k in labels]),
        "donor": [f"donor_{i % 2}" for i in range(n_cells)],
        "tissue": [("lung", "liver")[i % 2] for i in range(n_cells)],
    }, index=[f"cell{i:04d}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j:03d}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def counts_adata() -> ad.AnnData:
    return make_counts()


def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def write_loom(adata: ad.AnnData, path: Path) -> Path:
    import loompy

    row_attrs = {"Gene": np.asarray(adata.var_names, dtype=str)}
    col_attrs = {"CellID": np.asarray(adata.obs_names, dtype=str),
                 **{c: np.asarray(adata.obs[c], dtype=str) for c in adata.obs.columns}}
    loompy.create(str(path), sp.csr_matrix(adata.X).T.tocoo(), row_attrs, col_attrs)
    return path


def write_csv(adata: ad.AnnData, path: Path, *, header: bool = True, index: bool = True, sep: str = ",") -> Path:
    frame = pd.DataFrame(sp.csr_matrix(adata.X).toarray(), index=adata.obs_names, columns=adata.var_names)
    frame.to_csv(path, header=header, index=index, sep=sep)
    return path


def write_mtx(adata: ad.AnnData, directory: Path) -> Path:
    directory.mkdir()
    scipy.io.mmwrite(str(directory / "matrix.mtx"), sp.csr_matrix(adata.X).T.tocoo())
    pd.DataFrame({"id": [f"ENSG{i:05d}" for i in range(adata.n_vars)], "symbol": adata.var_names,
                  "type": "Gene Expression"}).to_csv(directory / "features.tsv", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(directory / "barcodes.tsv", sep="\t", header=False, index=False)
    return directory


def write_lines(path: Path, items) -> Path:
    path.write_text("\n".join(map(str, items)) + "\n")
    return path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args):
    """Run the CLI; arguments may be paths."""
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """A failed CLI call: non-zero exit, exactly one 'Error:' line, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in error_lines[0].lower(), (fragment, error_lines[0])


@pytest.fixture
def h5ad_path(tmp_path, counts_adata) -> Path:
    return write_h5ad(counts_adata, tmp_path / "ref.h5ad")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One finished CLI training run on synthetic data, shared by read-only tests."""
    directory = tmp_path_factory.mktemp("trained")
    data = write_h5ad(make_counts(n_cells=300, seed=1), directory / "ref.h5ad")
    result = CliRunner().invoke(app, ["train_tissue_independent", "--input_counts", str(data),
                                      "--lower_group", "cell_type", "--out_path", str(directory / "run"),
                                      *FAST_FLAGS])
    assert result.exit_code == 0, result.output
    return directory / "run"


def shared_data(name: str) -> Path:
    """A real dataset: skipped with a reason when ../shared is absent, a failure under CI=true."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"real dataset {path} is not available (../shared/data sits beside the checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI=true it must be present")
        pytest.skip(message)
    return path
