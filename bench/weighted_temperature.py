"""Probe (issue 11): does an importance-weighted temperature calibrate the fold ensemble on shifted queries?

Each model's temperature is fitted on the labeled cells it was not fit on (the model-selection split and, for a
fold model, its held-out cells). A query from another domain is classified less accurately than those cells,
so the calibrated ensemble is overconfident there (bench/results/trust.md). Under covariate shift the fix is to
weigh the calibration cells by the likelihood ratio p(query | x) / p(reference | x) (as weighted conformal sets
do, Tibshirani et al. 2019; for calibration, Park et al. 2020): here from the same logistic-regression domain
classifier on each model's embedding (scnym_cli.train.conformal.DomainWeights, cross-fitted weights).

For every run of bench/trust.py (5 folds + all_data, 11 splits x 3 seeds; trained there, reused here), each
member's temperature is refitted with and without the weights on its own calibration cells, and the query's ECE
of the averaged ensemble (the default ``--ensemble all``) is compared. The unweighted refit reproduces the
temperatures scnym stored (a check of the probe itself).

    python bench/weighted_temperature.py [--splits ...] [--seeds 0 1 2]

Writes bench/results/weighted_temperature.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SPLITS, WORK, machine, materialize, provenance, write_json, write_markdown  # noqa: E402

# query cells the domain classifier sees (a random draw), as prediction's weighted sets draw them
QUERY_SAMPLE = 5000


def expression(path: Path, genes: pd.Index):
    """ln(CPM+1) over the model's genes (CSR) and the AnnData's obs."""
    import anndata as ad

    from scnym_cli.data.genes import reindex_columns
    from scnym_cli.data.normalize import normalize

    adata = ad.read_h5ad(path)
    X, _ = normalize(adata.X, "auto", source=str(path), copy=True, announce=False)
    return reindex_columns(X.tocsr(), adata.var_names, genes), adata.obs


def measure(split_name: str, seed: int, args) -> dict:
    import torch

    from scnym_cli.store import load_model
    from scnym_cli.train.calibration import fit_temperature
    from scnym_cli.train.conformal import DomainWeights
    from scnym_cli.train.metrics import calibration_error_floor, calibration_error_of, confidence_bins
    from scnym_cli.workflows.ensemble import _forward

    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=None)
    run = args.work / "trust" / split_name / f"seed{seed}" / "model"
    members = [run / f"fold{k:02d}" for k in range(5)] + [run / "all_data"]
    loaded = [load_model(m, torch.device("cpu")) for m in members]
    genes, classes = pd.Index(loaded[0].genes), loaded[0].classes
    ref_X, ref_obs = expression(reference, genes)
    query_X, query_obs = expression(query, genes)
    ref_codes = pd.Index(classes).get_indexer(ref_obs[split.label].astype(str))
    query_codes = pd.Index(classes).get_indexer(query_obs[split.label].astype(str))
    known = query_codes >= 0
    sample = np.sort(np.random.default_rng(seed).permutation(query_X.shape[0])[:QUERY_SAMPLE])

    row: dict = {"split": split_name, "seed": seed}
    averaged = {"stored": 0.0, "refit": 0.0, "weighted": 0.0}
    temperatures = {k: [] for k in averaged}
    for member in loaded:
        # the cells the stored temperature was fitted on: the fold's held-out and model-selection cells
        held = member.directory / "test_idx.csv"
        rows = np.sort(np.concatenate([
            member.calibration.rows, ref_obs.index.get_indexer(pd.read_csv(held)["cell_id"].astype(str))
            if held.exists() else np.zeros(0, dtype=np.int64)]))
        rows = np.unique(rows)
        calibration = _forward(member, ref_X[rows], torch.device("cpu"), None, True, torch.float32)
        on_query = _forward(member, query_X, torch.device("cpu"), None, True, torch.float32)
        weights = DomainWeights.fit(calibration.embedding, on_query.embedding[sample], seed).calibration_weights
        fitted = {"stored": member.temperature, "refit": fit_temperature(calibration.logits, ref_codes[rows]),
                  "weighted": fit_temperature(calibration.logits, ref_codes[rows], weights=weights)}
        for name, temperature in fitted.items():
            temperatures[name].append(temperature)
            averaged[name] = averaged[name] + on_query.probabilities(temperature) / len(loaded)
        row.setdefault("effective_share", []).append(float(weights.sum() ** 2 / (weights ** 2).sum() / len(weights)))
    row["effective_share"] = float(np.mean(row["effective_share"]))
    for name, probabilities in averaged.items():
        confidence = probabilities.max(1)[known]
        correct = probabilities.argmax(1)[known] == query_codes[known]
        bins = confidence_bins(confidence, correct, 15)
        row[f"{name}_ece"] = calibration_error_of(bins)
        row[f"{name}_overconfidence"] = float(confidence.mean() - correct.mean())
        row[f"{name}_temperature"] = float(np.mean(temperatures[name]))
        if name == "stored":
            row["ece_floor"] = calibration_error_floor(bins)
    print(f"{split_name:32s} seed {seed}: ECE stored {row['stored_ece']:.3f} refit {row['refit_ece']:.3f} "
          f"weighted {row['weighted_ece']:.3f} (T {row['stored_temperature']:.2f} -> "
          f"{row['weighted_temperature']:.2f})",
          flush=True)
    return row


def report(frame: pd.DataFrame, command: str) -> list[str]:
    mean = frame.groupby("split", sort=False).mean(numeric_only=True)
    lines = ["# Importance-weighted temperature: calibration of the fold ensemble on shifted queries", "",
             *provenance(command, machine()), "",
             "Query ECE (cells of types the reference has) of the default ensemble (5 folds + all_data, calibrated "
             "probabilities averaged), mean over seeds, with each member's temperature as scnym stored it, refitted "
             "the same way (a check of the probe), and refitted with its calibration cells weighted by p(query | x) "
             "/ p(reference | x) of a domain classifier on that member's embedding. *effective*: the weighted "
             "calibration set's effective size (Kish) as a share of its cells; *floor*: the ECE a perfectly "
             "calibrated model shows at these confidences and this many cells. See the script's docstring.", "",
             "| split | ECE stored | refit | weighted | floor | conf. − acc. stored | weighted | mean T stored | "
             "weighted | effective |", "|---" * 10 + "|"]
    for split, r in mean.iterrows():
        lines.append(f"| {SPLITS[split].description} | {r.stored_ece:.3f} | {r.refit_ece:.3f} | {r.weighted_ece:.3f} | "
                     f"{r.ece_floor:.3f} | {r.stored_overconfidence:+.3f} | {r.weighted_overconfidence:+.3f} | "
                     f"{r.stored_temperature:.2f} | {r.weighted_temperature:.2f} | {r.effective_share:.2f} |")
    m = mean.mean()
    lines += [f"| **mean** | {m.stored_ece:.3f} | {m.refit_ece:.3f} | {m.weighted_ece:.3f} | {m.ece_floor:.3f} | "
              f"{m.stored_overconfidence:+.3f} | {m.weighted_overconfidence:+.3f} | {m.stored_temperature:.2f} | "
              f"{m.weighted_temperature:.2f} | {m.effective_share:.2f} |", "",
              f"ECE <= 0.02: stored {(mean.stored_ece <= 0.02).sum()} of {len(mean)} splits, weighted "
              f"{(mean.weighted_ece <= 0.02).sum()} of {len(mean)}."]
    return lines


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="weighted_temperature")
    args = parser.parse_args(argv)
    command = "python bench/weighted_temperature.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frame = pd.DataFrame([measure(s, seed, args) for s in args.splits for seed in args.seeds])
    finally:
        torch.set_num_threads(threads)
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": machine(),
                                               "rows": frame.to_dict(orient="records")})
    write_markdown(args.out / f"{args.tag}.md", report(frame, command))
    return frame


if __name__ == "__main__":
    main()
