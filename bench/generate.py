"""Realistic large single-cell data for the scale benchmarks, written block by block to h5ad.

Cells are real cells resampled with replacement from ../shared/data with count noise: each
cell's counts are redrawn as Poisson(counts x s), s ~ LogNormal(0, 0.3) per cell (a depth
change plus sampling noise). Genes beyond those of the source are 'pseudo-genes': the profile
of a random real gene taken from another random cell of the same cell type (keeping realistic
per-gene distributions and sparsity without duplicating columns). Labels (cell types) and a
donor/technology column come along.

    python bench/generate.py --cells 1000000 --genes 2000 --out bench/work/scale/cells1000000_genes2000.h5ad
    python bench/generate.py --cells 100000 --genes 20000 --out ...      # CellBench source (18,436 genes)

Memory: one block of ``--block`` cells at a time (default 50,000).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA  # noqa: E402

SOURCES = {  # file, label column, group column
    "kang": ("kang2018_ctrl_8donors.h5ad", "cluster_id", "sample_id"),
    "cellbench": ("cellbench_celseq2_dropseq.h5ad", "cell_line", "technology"),
}


def load_source(name: str):
    import anndata as ad

    file, label, group = SOURCES[name]
    source = ad.read_h5ad(SHARED_DATA / file)
    X = sp.csr_matrix(source.X).astype(np.float32)
    return X, pd.Index(source.var_names.astype(str)), source.obs[label].astype(str).to_numpy(), \
        source.obs[group].astype(str).to_numpy()


def pseudo_gene_plan(n_real: int, n_genes: int, rng) -> np.ndarray:
    """For each extra gene, the real gene whose profile it borrows."""
    return rng.integers(0, n_real, size=max(n_genes - n_real, 0))


def make_block(X: sp.csr_matrix, labels: np.ndarray, rows: np.ndarray, borrowed: np.ndarray, rng) -> sp.csr_matrix:
    """Resampled cells ``rows`` of X with count noise, plus pseudo-genes (borrowed from same-type cells)."""
    block = X[rows].tocsr()
    if len(borrowed):
        donors = np.empty(len(rows), dtype=np.int64)
        for label in np.unique(labels[rows]):  # a same-type cell lends each pseudo-gene row
            members = np.flatnonzero(labels == label)
            at = labels[rows] == label
            donors[at] = rng.choice(members, size=int(at.sum()))
        block = sp.hstack([block, X[donors][:, borrowed]], format="csr")
    scale = rng.lognormal(0.0, 0.3, size=len(rows)).astype(np.float64)
    block.data = rng.poisson(block.data * np.repeat(scale, np.diff(block.indptr))).astype(np.float32)
    block.eliminate_zeros()
    return block


def generate(n_cells: int, n_genes: int, out: Path, *, source: str = "kang", block_size: int = 50_000,
             seed: int = 0) -> dict:
    import anndata.io
    import h5py

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    X, genes, labels, groups = load_source(source)
    if n_genes < X.shape[1]:  # keep the most expressed genes
        keep = np.sort(np.argsort(-np.asarray((X > 0).sum(axis=0)).ravel())[:n_genes])
        X, genes = X[:, keep], genes[keep]
    borrowed = pseudo_gene_plan(X.shape[1], n_genes, rng)  # drawn for every seed: keeps its cell stream
    if seed != 0:  # every file of one width shares seed 0's pseudo-genes, so reference and target align
        borrowed = pseudo_gene_plan(X.shape[1], n_genes, np.random.default_rng(0))
    gene_names = list(genes) + [f"{genes[g]}_pseudo{i}" for i, g in enumerate(borrowed)]
    picks = rng.integers(0, X.shape[0], size=n_cells)
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels[picks]), "group": pd.Categorical(groups[picks])},
                       index=[f"cell{i:08d}" for i in range(n_cells)])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.h5ad")
    nnz = 0
    with h5py.File(partial, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", pd.DataFrame(index=pd.Index(gene_names)))
        for group in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            anndata.io.write_elem(f, group, {})
        matrix = None
        for start in range(0, n_cells, block_size):
            block = make_block(X, labels, picks[start:start + block_size], borrowed, rng)
            nnz += block.nnz
            if matrix is None:
                anndata.io.write_elem(f, "X", block, dataset_kwargs={"chunks": True})
                matrix = anndata.io.sparse_dataset(f["X"])
            else:
                matrix.append(block)
    partial.rename(out)
    info = {"path": str(out), "cells": n_cells, "genes": n_genes, "nnz": int(nnz), "source": source,
            "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - started, 1)}
    print(info, flush=True)
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--source", choices=list(SOURCES), default=None,
                        help="default: kang up to 2,000 genes, cellbench beyond")
    parser.add_argument("--block", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    source = args.source or ("kang" if args.genes <= 2000 else "cellbench")
    return generate(args.cells, args.genes, args.out, source=source, block_size=args.block, seed=args.seed)


if __name__ == "__main__":
    main()
