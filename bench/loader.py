"""Minibatches from disk: scnym's DiskMatrix + BlockShuffleSampler vs scverse's annbatch (0.3.1).

Both loaders deliver the same thing a training step consumes: dense float32 batches of 256 cells x
2,000 genes, ln(CPM+1)-normalized, read from disk (never the whole matrix in memory).

- scnym reads the h5ad as it is: blocks of 8,192 rows, normalized on read, an epoch visits the blocks
  in random order a window of 8 blocks (65,536 cells, --read_buffer_cells) at a time, rows shuffled
  within the window. No preparation.
- annbatch first converts the h5ad into its pre-shuffled, sharded zarr collection (one-off cost, timed
  here), then its Loader reads random chunks of 512 contiguous rows (of the already shuffled store),
  ``preload_nchunks`` at a time, and cuts them into batches. annbatch has no normalization, so the
  annbatch worker applies scnym's ln(CPM+1) rule (same float32 arithmetic) to each batch's CSR rows before
  densifying; that cost is inside its timing. It is run with its defaults (512 x 32 = 16,384 cells in
  memory) and with scnym's window size (512 x 128 = 65,536 cells).

Each loader runs in its own subprocess (scnym in this venv, annbatch in its own Python >= 3.12 venv,
see --annbatch_python), under /usr/bin/time for peak RSS: one untimed warm-up epoch that also records
what was delivered (cell ids, per-cell checksums, full rows of a fixed sample of cells), then
``--epochs`` timed epochs (median reported). Writes ``<out>/loader.json`` and ``loader.md``.

    python bench/loader.py --cells 100000
    python bench/loader.py --cells 1000000
    python bench/loader.py --quick --out /tmp/x          # a few seconds, 3,000 cells

The annbatch venv (kept out of scnym's own dependencies):
    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/annbatch-venv
    /tmp/annbatch-venv/bin/pip install annbatch==0.3.1 anndata scipy numpy
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCH = 256
BLOCK_ROWS = 8192            # scnym_cli.workflows.inputs.BLOCK_ROWS
READ_BUFFER_CELLS = 65_536   # scnym's default --read_buffer_cells
TARGET_SUM = 1e6             # ln(CPM+1)
N_SAMPLE = 500               # cells whose full normalized rows are compared value by value
# annbatch Loader settings compared: (label, chunk_size, preload_nchunks)
ANNBATCH_CONFIGS = [("annbatch (defaults: 512 x 32 chunks)", 512, 32),
                    ("annbatch (512 x 128 chunks = scnym's window)", 512, 128)]


# ---------------------------------------------------------------- what both workers record

class Recorder:
    """What one epoch delivered: the source row of every cell, two per-cell checksums (the second weights
    each gene by its position, so genes shifted between columns show), and the full rows of a fixed sample."""

    def __init__(self, n_cells: int, n_genes: int):
        self.ids, self.sums, self.weighted = [], [], []
        self.weights = np.arange(1, n_genes + 1, dtype=np.float64)
        self.sample = np.random.default_rng(1).choice(n_cells, size=min(N_SAMPLE, n_cells), replace=False)
        self.sample_rows = {}

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.ids.append(ids)
        self.sums.append(x.sum(axis=1, dtype=np.float64))
        self.weighted.append(x.astype(np.float64) @ self.weights)
        for at in np.flatnonzero(np.isin(ids, self.sample)):
            self.sample_rows[int(ids[at])] = x[at].copy()

    def save(self, path: Path) -> None:
        sample = np.array(sorted(self.sample_rows), dtype=np.int64)
        np.savez(path, ids=np.concatenate(self.ids), sums=np.concatenate(self.sums),
                 weighted=np.concatenate(self.weighted), sample_ids=sample,
                 sample_rows=np.stack([self.sample_rows[i] for i in sample]) if len(sample) else np.zeros((0, 0)))


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_epochs(run_epoch, epochs: int) -> dict:
    """``run_epoch()`` -> list of id arrays; seconds of each epoch and how many cells it delivered (distinct)."""
    seconds, delivered, distinct = [], [], []
    for _ in range(epochs):
        started = time.perf_counter()
        ids = run_epoch()
        seconds.append(time.perf_counter() - started)
        ids = np.concatenate(ids)
        delivered.append(int(len(ids)))
        distinct.append(int(len(np.unique(ids))))
    return {"epoch_seconds": seconds, "cells_per_epoch": delivered, "distinct_cells_per_epoch": distinct}


# ---------------------------------------------------------------- scnym worker (runs in scnym's venv)

def worker_scnym(args) -> dict:
    # built the way workflows/inputs.py (load_training_inputs_backed) and train/trainer.py (_sampler,
    # _labeled_batch) do it, for one h5ad of reference cells and all of its genes
    import pandas as pd
    import torch

    from scnym_cli.data.batches import batch_tensor
    from scnym_cli.data.disk import BlockShuffleSampler, DiskMatrix, DiskPart
    from scnym_cli.data.normalize import DETECTION_ROWS, normalize
    from scnym_cli.data.stream import H5adChunks

    torch.set_num_threads(args.threads)
    baseline = rss_mb()  # the interpreter + torch + scnym, before any data
    started = time.perf_counter()
    reader = H5adChunks(args.data)
    _, kind = normalize(reader.read(0, min(DETECTION_ROWS, reader.n_cells)), "auto", source=str(args.data),
                        copy=False, announce=False)
    genes = pd.Index(reader.genes)
    window = max(1, READ_BUFFER_CELLS // BLOCK_ROWS)
    cache_blocks = 2 * window + 2
    matrix = DiskMatrix([DiskPart(reader, genes, kind, 0, "auto")], genes, block_rows=BLOCK_ROWS,
                        cache_blocks=cache_blocks)
    rows = np.arange(matrix.shape[0])
    setup = time.perf_counter() - started
    device = torch.device("cpu")

    def epoch(sampler, record=None):
        if args.cold:
            # data that fits in the block cache would otherwise be served from memory after the warm-up
            matrix._cache.clear()
        ids = []
        for batch_rows in sampler.epoch():
            x = batch_tensor(matrix, batch_rows, device)
            ids.append(batch_rows)
            if record is not None:
                record.add(batch_rows, x.numpy())
        return ids

    # warm-up epoch, every cell (drop_last=False), recorded for the equivalence check
    record = Recorder(matrix.shape[0], matrix.shape[1]) if args.record else None
    epoch(BlockShuffleSampler(rows, BATCH, matrix, window_blocks=window, drop_last=False, seed=1), record)
    if record is not None:
        record.save(args.record)
    # timed epochs as the trainer runs them (drop_last=True)
    sampler = BlockShuffleSampler(rows, BATCH, matrix, window_blocks=window, seed=0)
    result = timed_epochs(lambda: epoch(sampler), args.epochs)
    return {"setup_seconds": setup, "n_cells": int(matrix.shape[0]), "n_genes": int(matrix.shape[1]),
            "rss_after_imports_mb": baseline, "n_blocks": len(matrix.block_bounds), "cache_blocks": cache_blocks,
            "settings": f"blocks of {BLOCK_ROWS}, window {window} blocks ({window * BLOCK_ROWS:,} cells), "
                        f"cache {cache_blocks} blocks" + (", cache emptied before each epoch" if args.cold else ""),
            **result}


# ---------------------------------------------------------------- annbatch workers (run in annbatch's venv)

def prepare_annbatch(args) -> dict:
    """Convert the h5ad into annbatch's pre-shuffled zarr collection, with the source row of every cell in
    obs (so that the loader's cells can be matched to scnym's)."""
    import shutil

    import anndata as ad
    import h5py
    import pandas as pd
    from annbatch import DatasetCollection

    def load(path):
        # only X (lazy, dask) and the source row: what training needs, and what the comparison needs
        lazy = ad.experimental.read_lazy(path)
        with h5py.File(path, "r") as f:
            var_names = ad.io.read_elem(f["var"]).index
        obs = pd.DataFrame({"src_row": np.arange(lazy.n_obs, dtype=np.int64)},
                           index=pd.Index([str(i) for i in range(lazy.n_obs)]))
        return ad.AnnData(X=lazy.X, obs=obs, var=pd.DataFrame(index=var_names))

    if args.store.exists():
        shutil.rmtree(args.store)
    started = time.perf_counter()
    DatasetCollection(args.store).add_adatas([str(args.data)], load_adata=load, dataset_size=args.dataset_size,
                                             rng=np.random.default_rng(0))
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in args.store.rglob("*") if p.is_file())
    return {"convert_seconds": seconds, "store_mb": size / 2**20, "dataset_size": args.dataset_size}


def normalize_like_scnym(X) -> np.ndarray:
    """ln(CPM+1) of a CSR batch of counts, the arithmetic of scnym_cli.data.normalize.to_log1p_cpm (row sums in
    float64, factors cast to the data's float32), then dense float32."""
    X.data = X.data.astype(np.float32, copy=False)
    sums = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    factors = np.divide(TARGET_SUM, sums, out=np.zeros_like(sums), where=sums > 0)
    X.data *= np.repeat(factors.astype(X.data.dtype), np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X.toarray()


def worker_annbatch(args) -> dict:
    import anndata as ad
    import pandas as pd
    import zarr
    from annbatch import DatasetCollection, Loader

    baseline = rss_mb()  # the interpreter + annbatch/zarr/anndata, before any data
    started = time.perf_counter()
    collection = DatasetCollection(args.store, mode="r")
    # the loader's index is the row in the collection (concatenated datasets): map it back to the source row
    source_row = collection.obs(columns=["src_row"])["src_row"].to_numpy()

    def x_only(group: zarr.Group) -> ad.AnnData:
        # no obs columns: the loader would otherwise build a DataFrame per batch (the index is enough here)
        X = ad.io.sparse_dataset(group["X"])
        return ad.AnnData(X=X, obs=pd.DataFrame(index=pd.RangeIndex(X.shape[0]).astype(str)))

    def loader(drop_last: bool, seed: int):
        return Loader(chunk_size=args.chunk_size, preload_nchunks=args.preload_nchunks, batch_size=BATCH,
                      shuffle=True, drop_last=drop_last, return_index=True, preload_to_gpu=False,
                      rng=np.random.default_rng(seed)).use_collection(collection, load_adata=x_only)

    timed = loader(True, 0)
    setup = time.perf_counter() - started
    n_cells, n_genes = timed.n_obs, timed.n_var

    spent = []  # seconds in our normalization + densifying (not annbatch's), per timed epoch

    def epoch(batches, record=None):
        ids, own = [], 0.0
        for out in batches:
            started = time.perf_counter()
            x = normalize_like_scnym(out["X"])
            own += time.perf_counter() - started
            rows = source_row[out["index"]]
            ids.append(rows)
            if record is not None:
                record.add(rows, x)
        if batches is timed:
            spent.append(own)
        return ids

    record = Recorder(n_cells, n_genes) if args.record else None
    epoch(loader(False, 1), record)
    if record is not None:
        record.save(args.record)
    result = timed_epochs(lambda: epoch(timed), args.epochs)
    return {"setup_seconds": setup, "n_cells": int(n_cells), "n_genes": int(n_genes),
            "rss_after_imports_mb": baseline,
            "settings": f"chunk_size {args.chunk_size}, preload_nchunks {args.preload_nchunks} "
                        f"({args.chunk_size * args.preload_nchunks:,} cells in memory)",
            "normalize_densify_seconds": spent, **result}


# ---------------------------------------------------------------- driver (scnym's venv)

def equivalence(scnym: Path, other: Path, n_cells: int) -> dict:
    """Do two recorded epochs hold every cell once, and the same values per cell?"""
    a, b = np.load(scnym), np.load(other)
    every = np.arange(n_cells)
    same_cells = bool(np.array_equal(np.sort(a["ids"]), every) and np.array_equal(np.sort(b["ids"]), every))
    order_a, order_b = np.argsort(a["ids"]), np.argsort(b["ids"])
    out = {"same_multiset_of_cells": same_cells}
    if same_cells:
        sums = np.abs(a["sums"][order_a] - b["sums"][order_b])
        weighted = np.abs(a["weighted"][order_a] - b["weighted"][order_b])
        out["max_abs_diff_row_sum"] = float(sums.max())
        out["max_rel_diff_weighted_sum"] = float((weighted / np.maximum(np.abs(a["weighted"][order_a]), 1e-12)).max())
    sample_same = np.array_equal(a["sample_ids"], b["sample_ids"])
    out["sample_cells_compared"] = int(len(a["sample_ids"])) if sample_same else 0
    if sample_same and len(a["sample_ids"]):
        out["sample_max_abs_diff"] = float(np.abs(a["sample_rows"] - b["sample_rows"]).max())
        out["sample_identical"] = bool(np.array_equal(a["sample_rows"], b["sample_rows"]))
    out["equivalent"] = bool(same_cells and out.get("sample_max_abs_diff", 1.0) <= 1e-5
                             and out.get("max_rel_diff_weighted_sum", 1.0) <= 1e-5)
    return out


def ensure_data(cells: int, work: Path) -> Path:
    path = work / f"cells{cells}_genes2000.h5ad"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--cells", str(cells), "--genes", "2000",
                        "--out", str(path)], check=True)
    return path


def annbatch_versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m, sys; print(json.dumps({p: m.version(p) for p in "
            "['annbatch', 'anndata', 'zarr', 'numpy', 'scipy', 'dask']} | {'python': sys.version.split()[0], "
            "'requires_python': m.metadata('annbatch')['Requires-Python']}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (median), after one warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loader, interleaved (median)")
    parser.add_argument("--quick", action="store_true", help="3,000 cells, 2 epochs (smoke run)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--annbatch_python", default="/tmp/annbatch-venv/bin/python")
    parser.add_argument("--dataset_size", default="2GB",
                        help="annbatch's rows shuffled in memory per output dataset (its default, 20GB, would hold "
                             "all of a 1M-cell set in memory on this 24 GB machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report_only", action="store_true", help="rewrite loader.md from <out>/loader.json")
    # worker roles (the driver calls itself)
    parser.add_argument("--role", choices=["driver", "scnym", "annbatch", "prepare"], default="driver",
                        help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--preload_nchunks", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role != "driver":
        result = {"scnym": worker_scnym, "annbatch": worker_annbatch, "prepare": prepare_annbatch}[args.role](args)
        args.result.write_text(json.dumps(result))
        return result

    sys.path.insert(0, str(HERE))
    from common import RESULTS, WORK, machine, provenance, run_measured, write_json, write_markdown

    if args.report_only:
        out = args.out or RESULTS
        payload = json.loads((out / "loader.json").read_text())
        payload["versions"] = payload.get("versions", {}) | versions(args.annbatch_python)
        write_json(out / "loader.json", payload)
        write_markdown(out / "loader.md", report(payload, provenance))
        return payload
    if args.quick:
        args.cells, args.epochs, args.repeats = 3000, 2, 1
    work = args.work or WORK / "loader"
    out = args.out or RESULTS
    command_line = "python bench/loader.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    data = ensure_data(args.cells, work)
    runs = work / f"runs_{args.cells}"
    runs.mkdir(parents=True, exist_ok=True)
    me = str(Path(__file__).resolve())

    def worker(python: str, name: str, role: str, *extra) -> dict:
        result = runs / f"{name}.json"
        measured = run_measured([python, me, "--role", role, "--data", str(data), "--result", str(result),
                                 "--epochs", str(args.epochs), "--threads", str(args.threads), *extra],
                                runs / f"{name}.log")
        return {**json.loads(result.read_text()), "wall_seconds": measured["seconds"],
                "peak_memory_mb": measured["peak_memory_mb"]}

    store = work / f"cells{args.cells}_genes2000.annbatch.zarr"
    prepared = worker(args.annbatch_python, "annbatch_prepare", "prepare", "--store", str(store),
                      "--dataset_size", args.dataset_size)
    print("annbatch conversion:", prepared, flush=True)

    # (label, python, role, extra args) of each loader measured
    loaders = [("scnym (DiskMatrix + BlockShuffleSampler)", sys.executable, "scnym", [])]
    if args.cells <= (2 * (READ_BUFFER_CELLS // BLOCK_ROWS) + 2) * BLOCK_ROWS:
        # the whole set fits in scnym's block cache (2 windows + 2 blocks): its timed epochs would read nothing
        # from the file, so also measure it reading every block again each epoch (what larger data does)
        loaders.append(("scnym, block cache emptied each epoch", sys.executable, "scnym", ["--cold"]))
    for label, chunk_size, preload in ANNBATCH_CONFIGS:
        loaders.append((label, args.annbatch_python, "annbatch", ["--store", str(store), "--chunk_size",
                                                                  str(chunk_size), "--preload_nchunks", str(preload)]))
    # repeats interleave the loaders, so that a slow spell of this shared machine hits them alike; the ratio to
    # scnym is taken within each repeat
    runs_of = {label: [] for label, *_ in loaders}
    for repeat in range(args.repeats):
        for i, (label, python, role, extra) in enumerate(loaders):
            record = runs / f"loader{i}_epoch.npz"
            result = worker(python, f"loader{i}_r{repeat}", role, *extra,
                            *(["--record", str(record)] if repeat == 0 else []))
            result["median_epoch_seconds"] = float(np.median(result["epoch_seconds"]))
            result["cells_per_second"] = float(np.median(result["cells_per_epoch"])) / result["median_epoch_seconds"]
            result["record"] = str(record)
            runs_of[label].append(result)
            print(label, {k: result[k] for k in ("cells_per_second", "peak_memory_mb", "epoch_seconds")}, flush=True)

    rows = []
    reference = runs_of[loaders[0][0]]
    for label, *_ in loaders:
        runs_here = runs_of[label]
        first = runs_here[0]
        rows.append({
            "loader": label, "n_cells": first["n_cells"], "n_genes": first["n_genes"], "settings": first["settings"],
            "preparation_seconds": 0.0 if label.startswith("scnym") else prepared["convert_seconds"],
            "preparation_peak_mb": None if label.startswith("scnym") else prepared["peak_memory_mb"],
            "median_epoch_seconds": float(np.median([r["median_epoch_seconds"] for r in runs_here])),
            "cells_per_second": float(np.median([r["cells_per_second"] for r in runs_here])),
            "scnym_over_this_throughput": float(np.median([a["cells_per_second"] / b["cells_per_second"]
                                                           for a, b in zip(reference, runs_here)])),
            "peak_memory_mb": float(np.median([r["peak_memory_mb"] for r in runs_here])),
            "rss_after_imports_mb": float(np.median([r["rss_after_imports_mb"] for r in runs_here])),
            "each_cell_at_most_once": all(d == c for r in runs_here for d, c in zip(r["distinct_cells_per_epoch"],
                                                                                   r["cells_per_epoch"])),
            "equivalence_vs_scnym": None if label == loaders[0][0] else equivalence(
                Path(reference[0]["record"]), Path(first["record"]), args.cells),
            **({"normalize_densify_seconds": [x for r in runs_here for x in r["normalize_densify_seconds"]]}
               if "normalize_densify_seconds" in first else {}),
            "runs": runs_here})

    info = machine()
    payload = {"command": command_line, "machine": info, "versions": versions(args.annbatch_python),
               "cells": args.cells, "genes": 2000, "batch_size": BATCH, "epochs_timed": args.epochs,
               "repeats": args.repeats,
               "h5ad_mb": data.stat().st_size / 2**20, "annbatch_preparation": prepared, "rows": rows}
    write_json(out / "loader.json", payload)
    write_markdown(out / "loader.md", report(payload, provenance))
    return payload


def versions(annbatch_python: str) -> dict:
    return {"scnym_python": sys.version.split()[0], "annbatch_venv": annbatch_versions(annbatch_python)}


def conclusion(payload: dict) -> list[str]:
    """The plain reading of the figures (worded from them, so that it follows a rerun)."""
    rows, prepared = payload["rows"], payload["annbatch_preparation"]
    # scnym reading from disk: where the data fit its block cache, the run that empties it each epoch
    scnym = next((r for r in rows if r["loader"].startswith("scnym, block cache emptied")), rows[0])
    annbatch = [r for r in rows if r["loader"].startswith("annbatch")]
    fastest = max(annbatch, key=lambda r: r["cells_per_second"])
    leanest = min(annbatch, key=lambda r: r["peak_memory_mb"])
    faster = scnym["cells_per_second"] >= fastest["cells_per_second"]
    equivalent = all(r["equivalence_vs_scnym"]["equivalent"] for r in annbatch)
    epochs_of_prep = prepared["convert_seconds"] / scnym["median_epoch_seconds"]
    av = payload["versions"]["annbatch_venv"]
    lines = ["## Conclusion", "",
             f"- Throughput: {'scnym' if faster else 'annbatch'} is faster here: scnym "
             f"{scnym['cells_per_second']:,.0f} cells/s vs annbatch's best {fastest['cells_per_second']:,.0f} "
             f"({fastest['loader']}), a ratio of {scnym['cells_per_second'] / fastest['cells_per_second']:.2f}.",
             f"- Memory: annbatch's loader is leaner at {leanest['peak_memory_mb']:.0f} MB vs scnym's "
             f"{scnym['peak_memory_mb']:.0f} MB ({leanest['loader']}; scnym's process also holds torch: "
             f"{scnym.get('rss_after_imports_mb', float('nan')):.0f} MB before any data vs "
             f"{leanest.get('rss_after_imports_mb', float('nan')):.0f} MB)." if leanest["peak_memory_mb"]
             < scnym["peak_memory_mb"] else f"- Memory: scnym's loader is leaner ({scnym['peak_memory_mb']:.0f} MB "
             f"vs annbatch's lowest {leanest['peak_memory_mb']:.0f} MB).",
             f"- Preparation: annbatch must first convert the data ({prepared['convert_seconds']:.0f} s, as long as "
             f"{epochs_of_prep:.1f} of scnym's loading epochs, peak {prepared['peak_memory_mb']:.0f} MB, and a second "
             f"copy of {prepared['store_mb']:.0f} MB on disk, lz4-compressed); scnym reads the user's h5ad in place.",
             f"- Content: {'the batches are equivalent' if equivalent else 'the batches DIFFER'}: every cell once per "
             "epoch in both, identical ln(CPM+1) values. They differ in how they shuffle: annbatch's store is "
             "shuffled once across the whole data and an epoch mixes random 512-row chunks of it; scnym mixes the "
             "rows of 8 random 8,192-row blocks at a time (65,536 cells), from the file's own order.",
             f"- Dependencies: annbatch {av['annbatch']} requires Python {av.get('requires_python', '?')} and zarr 3 "
             f"(scnym's environment here runs Python {payload['versions']['scnym_python']}); it does not normalize "
             "or align genes, so scnym would still do both on each batch.", ""]
    if faster and equivalent:
        lines.append("Recommendation: keep scnym's own loader as the default. It is faster on this machine, needs no "
                     "conversion or second copy, and does scnym's normalization and gene alignment on read. "
                     "annbatch's gains are a lower memory ceiling and a global pre-shuffle; they are worth an "
                     "optional reader behind the same DiskMatrix/sampler interface (the batches are equivalent, so "
                     "it can plug in) only for users who already keep annbatch collections, or once GPU training "
                     "(annbatch's cupy preloading) matters, not a switch.")
    else:
        lines.append("Recommendation: offer both behind one interface (the batches are "
                     f"{'equivalent' if equivalent else 'not yet equivalent: fix that first'}); pick annbatch where "
                     "its throughput or memory wins pay back the conversion over the epochs trained.")
    return lines


def report(payload: dict, provenance) -> list[str]:
    rows, prepared, info = payload["rows"], payload["annbatch_preparation"], payload["machine"]

    def eq(row) -> str:
        e = row["equivalence_vs_scnym"]
        if e is None:
            return "reference"
        verdict = "yes" if e["equivalent"] else "NO"
        detail = f"same cells: {'yes' if e['same_multiset_of_cells'] else 'no'}"
        if "sample_max_abs_diff" in e:
            detail += (f"; max abs diff on {e['sample_cells_compared']} cells: {e['sample_max_abs_diff']:.1g}, "
                       f"checksums of all cells: {e.get('max_rel_diff_weighted_sum', float('nan')):.1g}")
        return f"{verdict} ({detail})"

    av = payload["versions"]["annbatch_venv"]
    lines = ["# Minibatches from disk: scnym's block loader vs annbatch", "",
             *provenance(payload["command"], info,
                         f"annbatch {av['annbatch']} (anndata {av['anndata']}, zarr {av['zarr']}, Python "
                         f"{av['python']}, its own venv). {payload['cells']:,} cells x 2,000 genes "
                         f"(bench/generate.py), batches of {payload['batch_size']} dense float32 ln(CPM+1) rows; "
                         f"cells/s = cells delivered per epoch / median of {payload['epochs_timed']} epochs after a "
                         f"warm-up, median of {payload.get('repeats', 1)} runs of each loader (interleaved; scnym / "
                         "this = median of the ratios within a run); peak memory = peak RSS of the loader's own "
                         "process (data files in the OS page "
                         "cache, as on a machine that has read them once)."), "",
             "| loader | cells | preparation (s) | s / epoch | cells / s | scnym / this | peak memory (MB) | of which "
             "imports (MB) | batches equivalent to scnym's? |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loader']} | {r['n_cells']:,} | {r['preparation_seconds']:.1f} | "
                     f"{r['median_epoch_seconds']:.2f} | {r['cells_per_second']:,.0f} | "
                     f"{r['scnym_over_this_throughput']:.2f} | {r['peak_memory_mb']:.0f} | "
                     f"{r.get('rss_after_imports_mb', float('nan')):.0f} | {eq(r)} |")
    lines += ["", f"annbatch's one-off conversion into its pre-shuffled zarr collection (dataset_size "
                  f"{prepared['dataset_size']}): {prepared['convert_seconds']:.1f} s, peak "
                  f"{prepared['peak_memory_mb']:.0f} MB, store {prepared['store_mb']:.0f} MB on disk (the h5ad: "
                  f"{payload['h5ad_mb']:.0f} MB). scnym reads the h5ad as it is.", "",
              *[f"Of {r['loader']}'s median epoch, {np.median(r['normalize_densify_seconds']):.2f} s is the "
                "ln(CPM+1) + densifying done on its batches here (the rest is annbatch's own reading and batching)."
                for r in rows if "normalize_densify_seconds" in r], "",
              "Settings: " + "; ".join(f"{r['loader']}: {r['settings']}" for r in rows) + ".", "",
              "Equivalence: one recorded (untimed) epoch of each loader, no cell dropped; same cells = every source "
              "row exactly once in both; values compared on all cells through two per-cell checksums (row sum, "
              f"gene-position-weighted sum; largest relative difference shown) and row by row on {N_SAMPLE} fixed "
              "cells. annbatch has no normalization of its own: its batches are normalized with scnym's ln(CPM+1) "
              "arithmetic inside its timing.", "", *conclusion(payload)]
    return lines

if __name__ == "__main__":
    main()
