"""Build demo/kang_reference.h5ad and demo/kang_query.h5ad, the small real data the demo uses.

Source: Kang et al. 2018 (GSE96583), control PBMCs of 8 donors, 10x Chromium, as distributed
in the muscat R package (HelenaLC/muscat, data/kang_se.rda) = ../shared/data/kang2018_ctrl_8donors.h5ad.
We keep raw counts of 3 donors: 1,200 cells each of donors 1015 and 1256 (reference) and all 858
cells of donor 101 (query), sampled at random with a fixed seed. Only maintainers run this; the
result is committed so that the demo needs nothing outside the repository.

    python demo/build_demo_data.py ../shared/data/kang2018_ctrl_8donors.h5ad demo
"""

import sys

import anndata as ad
import numpy as np
import scipy.sparse as sp

source, target = sys.argv[1], sys.argv[2].rstrip("/")
full = ad.read_h5ad(source)
rng = np.random.default_rng(0)
keep = []
for donor, n in (("1015", 1200), ("1256", 1200), ("101", None)):
    rows = np.flatnonzero(full.obs["sample_id"].astype(str) == donor)
    keep.append(np.sort(rng.choice(rows, size=n, replace=False)) if n else rows)
subset = full[np.concatenate(keep)].copy()
subset.X = sp.csr_matrix(subset.X.astype(np.int32))
subset.obs = subset.obs[["sample_id", "cluster_id"]].astype(str).astype("category")
subset.var = subset.var[["ensembl"]]
subset.uns = {"source": "Kang et al. 2018 (GSE96583) control PBMCs via muscat kang_se; demo subset built by "
                        "demo/build_demo_data.py (seed 0)"}
is_query = (subset.obs["sample_id"] == "101").to_numpy()
for name, rows in (("reference", ~is_query), ("query", is_query)):
    part = subset[rows].copy()
    part.obs = part.obs.apply(lambda c: c.cat.remove_unused_categories())
    part.write_h5ad(f"{target}/kang_{name}.h5ad", compression="gzip")
    print(name, part)
