"""Per-domain normalization, measured on every split (issue 10): does matching each dataset's scale help?

Two probes, each against the default runs of bench/accuracy.py (run that first: this reuses its models):

* ``gene_means`` -- per-dataset, per-gene baseline matching of the target to the reference, the scale half
  of per-domain standardization. Every gene of the query is multiplied by (reference mean CPM + 1) /
  (query mean CPM + 1), the factors divided by their median (a global factor is undone by CPM anyway) and
  clipped to [1/20, 20]; cells are renormalized to CPM. The scaled query is the target of a default
  semi-supervised run and the file it predicts. (On the log scale this is a per-gene shift: the centring of
  a per-dataset z-score; the count-space augmentations need counts, so the sd part is not applied.)
* ``adabn`` -- domain-specific batch-norm statistics at prediction (AdaBN, Li et al. 2016): the default
  model's batch-norm statistics re-estimated on the query before it is predicted, for supervised and
  semi-supervised runs.

    python bench/normalization_probes.py --num_threads 1

Writes bench/results/normalization_probes.{md,json}: balanced accuracy, mean over seeds, with paired deltas.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import QUICK_FLAGS, defaults_fingerprint, evaluate, run  # noqa: E402
from common import (RESULTS, SPLITS, WORK, machine, materialize, provenance, scnym_command,  # noqa: E402
                    shared_genes_file, write_json, write_markdown)

MAX_FACTOR = 20.0


def scaled_query(reference: Path, query: Path, path: Path) -> Path:
    """The query with every gene's mean CPM matched to the reference's (see the module docstring), as
    ln(CPM + 1)."""
    import anndata as ad
    import scipy.sparse as sp

    from scnym_cli.data.normalize import normalize

    if path.exists():
        return path

    def mean_cpm(adata) -> tuple[sp.csr_matrix, np.ndarray]:
        X, _ = normalize(sp.csr_matrix(adata.X, dtype=np.float64), "auto", source=adata.filename or "input")
        cpm = X.expm1()
        return cpm, np.asarray(cpm.mean(axis=0)).ravel()

    ref, qry = ad.read_h5ad(reference), ad.read_h5ad(query)
    _, ref_means = mean_cpm(ref)
    counts, query_means = mean_cpm(qry)
    in_reference = ref.var_names.get_indexer(qry.var_names)
    shared = in_reference >= 0
    factors = np.ones(qry.n_vars)
    factors[shared] = (ref_means[in_reference[shared]] + 1.0) / (query_means[shared] + 1.0)
    factors[shared] /= np.median(factors[shared])
    factors = np.clip(factors, 1 / MAX_FACTOR, MAX_FACTOR)
    counts = sp.csr_matrix(counts @ sp.diags(factors))
    sizes = np.asarray(counts.sum(axis=1)).ravel()
    counts = sp.csr_matrix(sp.diags(1e6 / np.maximum(sizes, 1e-12)) @ counts)
    counts.data = np.log1p(counts.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(counts.astype(np.float32), obs=qry.obs, var=qry.var).write_h5ad(path)
    return path


@contextlib.contextmanager
def adabn_prediction():
    """Within the block, scnym predicts after re-estimating every batch norm's statistics on the cells it is given."""
    import torch

    import scnym_cli.workflows.ensemble as ensemble_module
    from scnym_cli.data.batches import batch_tensor

    original = ensemble_module.forward_rows

    def forward_rows(model, X, rows, device, **kwargs):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
        model.eval()
        for m in norms:   # cumulative averages over the query's batches, in train mode (batch statistics)
            m.reset_running_stats()
            m.momentum = None
            m.train()
        order = np.random.default_rng(0).permutation(X.shape[0])
        with torch.no_grad():
            for start in range(0, len(order), 256):
                batch = np.sort(order[start:start + 256])
                if len(batch) > 1:
                    model(batch_tensor(X, batch, device))
        model.eval()
        try:
            return original(model, X, rows, device, **kwargs)
        finally:
            for m, (momentum, state) in zip(norms, saved):
                m.momentum = momentum
                m.load_state_dict(state)

    ensemble_module.forward_rows = forward_rows
    try:
        yield
    finally:
        ensemble_module.forward_rows = original


def predict(model_dir: Path, query: Path, out: Path, threads: int) -> None:
    run([*scnym_command(), "predict_cell_types", "--model_path", str(model_dir), "--input_counts", str(query),
         "--out_path", str(out), "--overwrite", "true", "--write_h5ad", "false", "--quiet",
         "--num_threads", str(threads)], out / "predict.log", True)


def default_run(split: str, method: str, seed: int, work: Path) -> Path:
    run_dir = work / "runs" / split / method / f"seed{seed}"
    row = run_dir / "row.json"
    if not row.exists() or json.loads(row.read_text()).get("defaults") != defaults_fingerprint():
        raise SystemExit(f"{run_dir} is missing or ran under other defaults: run bench/accuracy.py --methods "
                         "supervised semi_supervised first")
    return run_dir


def probe(split_name: str, seed: int, args) -> list[dict]:
    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=200 if args.quick else None)
    base = args.work / "probes" / split_name
    rows = []
    for method in ("supervised", "semi_supervised"):
        run_dir = default_run(split_name, method, seed, args.work)
        plain = evaluate(run_dir / "predictions" / "predictions.csv", query, split.label)
        rows.append(dict(split=split_name, seed=seed, method=method, balanced_accuracy=plain["balanced_accuracy"]))
        out = base / f"adabn_{method}" / f"seed{seed}"
        if not (out / "predictions.csv").exists():
            with adabn_prediction():
                predict(run_dir / "model", query, out, args.num_threads)
        scores = evaluate(out / "predictions.csv", query, split.label)
        rows.append(dict(split=split_name, seed=seed, method=f"{method}+adabn",
                         balanced_accuracy=scores["balanced_accuracy"]))
    scaled = scaled_query(reference, query, args.work / "probes" / "data" / f"{query.stem}_gene_means.h5ad")
    run_dir = base / "semi_supervised+gene_means" / f"seed{seed}"
    train = [*scnym_command(), "train_tissue_independent", "--input_counts", str(reference), "--lower_group",
             split.label, "--out_path", str(run_dir / "model"), "--n_folds", "0", "--seed", str(seed),
             "--overwrite", "true", "--quiet", "--unlabeled_counts", str(scaled), "--num_threads",
             str(args.num_threads)]
    shared = shared_genes_file(reference, query)
    if shared is not None:
        train += ["--genes_to_use", str(shared)]
    if args.quick:
        train += QUICK_FLAGS
    stamp = {"command": shlex.join(train), "defaults": defaults_fingerprint()}
    done = run_dir / "stamp.json"
    if not (done.exists() and json.loads(done.read_text()) == stamp):
        run(train, run_dir / "train.log", True)
        predict(run_dir / "model", scaled, run_dir / "predictions", args.num_threads)
        write_json(done, stamp)
    scores = evaluate(run_dir / "predictions" / "predictions.csv", query, split.label)
    rows.append(dict(split=split_name, seed=seed, method="semi_supervised+gene_means",
                     balanced_accuracy=scores["balanced_accuracy"]))
    for r in rows:
        print(f"{split_name:30s} seed {seed} {r['method']:28s} {r['balanced_accuracy']:.4f}", flush=True)
    return rows


COLUMNS = [("supervised", None), ("supervised+adabn", "supervised"), ("semi_supervised", None),
           ("semi_supervised+adabn", "semi_supervised"), ("semi_supervised+gene_means", "semi_supervised")]


def report(frame: pd.DataFrame, command: str) -> list[str]:
    wide = frame.pivot_table(index=["split", "seed"], columns="method", values="balanced_accuracy")
    lines = ["# Per-domain normalization probes", "", *provenance(command, machine()), "",
             "Balanced accuracy (mean over seeds; in brackets the paired change against the method it modifies). "
             "`+adabn`: batch-norm statistics re-estimated on the query at prediction (domain-specific batch norm "
             "for the target). `+gene_means`: the query's genes scaled to the reference's mean expression "
             "(per-dataset gene baselines) for training and prediction. See the script's docstring.", "",
             "| split | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * (1 + len(COLUMNS)) + "|"]
    splits = list(dict.fromkeys(frame["split"]))
    for split in [*splits, None]:
        part = wide if split is None else wide.loc[split]
        means = part.groupby(level="split").mean().mean() if split is None else part.mean()
        cells = []
        for name, against in COLUMNS:
            cell = f"{means[name]:.3f}"
            if against is not None:
                delta = (part[name] - part[against])
                delta = delta.groupby(level="split").mean().mean() if split is None else delta.mean()
                cell += f" ({delta:+.3f})"
            cells.append(f"**{cell}**" if split is None else cell)
        title = "**mean over splits**" if split is None else SPLITS[split].description
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="normalization_probes")
    parser.add_argument("--quick", action="store_true", help="on bench/accuracy.py --quick runs (the test suite)")
    args = parser.parse_args(argv)
    command = "python bench/normalization_probes.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = [r for split in args.splits for seed in args.seeds for r in probe(split, seed, args)]
    frame = pd.DataFrame(rows)
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": machine(),
                                               "rows": frame.to_dict(orient="records")})
    write_markdown(args.out / f"{args.tag}.md", report(frame, command))


if __name__ == "__main__":
    main()
