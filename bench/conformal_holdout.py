"""Conformal sets on cells held out of every model of a run: the coverage a query exchangeable with the reference
gets from the sets scnym writes.

Cross-validation cannot measure the sets of the default ensemble: each fold's held-out cells were in the training
cells of every other fold model. So, per split and seed, 20% of the reference's labeled cells (stratified by type,
seeded) are set aside, the default semi-supervised run with 5 folds is trained on the other 80% (the split's query
as target data, as in bench/trust.py), and the set-aside cells are predicted: by the default ensemble with
``--coverage 0.9`` (the sets scnym writes, which hold the call), and by each fold model and all_data alone (their
calibrated probabilities, for the exact sets below).

Exact sets (plain conformal, a set may be empty) at coverage 0.9, over all cells and per class (Mondrian):
*pooled, all_data*: all_data's scores ranked among the folds' held-out cells' scores (what ``--ensemble all_data``
writes); *pooled, average*: the same for the ensemble's averaged probabilities (what the default wrote before
cross-conformal sets); *cross-conformal*: each fold model's score ranked among its own held-out cells' (what the
default writes now).

    python bench/conformal_holdout.py --num_threads 1 --seeds 0
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
from trust import default_run_command, predict_once, train_once  # noqa: E402

COVERAGE = 0.9
N_FOLDS = 5
HELD_OUT_SHARE = 0.2


def set_aside(reference: Path, label: str, seed: int, work: Path) -> tuple[Path, Path]:
    """(the reference without its set-aside cells, the set-aside cells), as h5ad files under ``work``."""
    import anndata as ad
    from sklearn.model_selection import train_test_split

    kept_path, aside_path = work / "reference.h5ad", work / "set_aside.h5ad"
    if kept_path.exists() and aside_path.exists():
        return kept_path, aside_path
    adata = ad.read_h5ad(reference)
    labels = adata.obs[label].astype(str).to_numpy()
    counts = pd.Series(labels).value_counts()
    # a type too rare to split stays whole in the reference
    splittable = np.flatnonzero(pd.Series(labels).map(counts).to_numpy() >= 5)
    _, aside = train_test_split(splittable, test_size=HELD_OUT_SHARE, stratify=labels[splittable],
                                random_state=seed)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[aside] = True
    work.mkdir(parents=True, exist_ok=True)
    adata[~mask].copy().write_h5ad(kept_path)
    adata[mask].copy().write_h5ad(aside_path)
    return kept_path, aside_path


def probabilities_of(out: Path, classes: list[str]) -> np.ndarray:
    return pd.read_csv(out / "predictions.csv")[[f"prob_{c}" for c in classes]].to_numpy()


def measure(split_name: str, seed: int, args) -> dict:
    import anndata as ad

    from scnym_cli.store import load_calibration
    from scnym_cli.train.conformal import (ConformalCalibration, CrossConformal, coverage_summary,
                                           prediction_sets)

    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=300 if args.quick else None)
    work = args.work / "conformal_holdout" / split_name / f"seed{seed}"
    kept, aside = set_aside(reference, split.label, seed, work)
    run_dir = work / "run"
    command = default_run_command(kept, query, split.label, run_dir, seed, args, N_FOLDS if not args.quick else 2)
    train_once(command, work, args)
    classes = json.loads((run_dir / "all_data" / "model.json").read_text())["classes"]
    folds = sorted(p for p in run_dir.glob("fold[0-9][0-9]") if p.is_dir())

    def predict(model: Path, name: str, *flags: str) -> Path:
        return predict_once(model, aside, work / name, work / "trained.json", args, *flags)

    truth = ad.read_h5ad(aside, backed="r").obs[split.label].astype(str).to_numpy()
    codes = pd.Index(classes).get_indexer(truth)
    if (codes < 0).any():
        raise RuntimeError(f"{split_name}: set-aside cells of types the run does not know")
    row: dict = {"split": split_name, "seed": seed, "cells": len(codes)}
    rows = np.arange(len(codes))
    fold_probabilities = [probabilities_of(predict(fold, fold.name), classes) for fold in folds]
    alone = probabilities_of(predict(run_dir / "all_data", "all_data"), classes)
    parts = [load_calibration(fold) for fold in folds]
    pooled = ConformalCalibration.concatenate(parts)
    cross = CrossConformal.from_folds(parts)
    average = np.mean([*fold_probabilities, alone], axis=0)
    row["accuracy"] = float((average.argmax(1) == codes).mean())
    for per_class, kind in ((False, "all"), (True, "per_class")):
        exact = {"pooled_all_data": prediction_sets(alone, pooled.thresholds(COVERAGE, per_class), with_top_class=False),
                 "pooled_average": prediction_sets(average, pooled.thresholds(COVERAGE, per_class),
                                                   with_top_class=False),
                 "cross": cross.sets(fold_probabilities, COVERAGE, per_class)}
        for name, sets in exact.items():
            for figure, value in coverage_summary(sets, codes, len(classes)).items():
                row[f"{kind}_{name}_{figure}"] = value
        out = predict(run_dir, f"written_{kind}", "--coverage", str(COVERAGE),
                      *(["--coverage_per_class", "true"] if per_class else []))
        summary = json.loads((out / "prediction_summary.json").read_text())
        row[f"{kind}_method"] = summary["calibration"]["method"]
        written = pd.read_csv(out / "predictions.csv", keep_default_na=False)["prediction_set"].astype(str)
        written_sets = np.array([[c in s.split("|") for c in classes] for s in written], dtype=bool)
        for figure, value in coverage_summary(written_sets, codes, len(classes)).items():
            row[f"{kind}_written_{figure}"] = value
        assert written_sets[rows, average.argmax(1)].all()
    # how many of the folds' held-out cells each fold model puts at a probability of exactly 1.0
    row["fold_share_at_one"] = [float((p.true_probability >= 1.0).mean()) for p in parts]
    return row


def report(frame: pd.DataFrame, command: str, info: dict) -> list[str]:
    mean = frame.groupby("split", sort=False).mean(numeric_only=True)
    names = {s: SPLITS[s].description for s in mean.index}
    lines = ["# Conformal sets on cells held out of every model", "", *provenance(command, info), "",
             (__doc__ or "").split("\n\n    python")[0].strip(), "",
             f"Coverage {COVERAGE}; mean over seeds ({', '.join(map(str, sorted(frame['seed'].unique())))}). "
             "*lowest*: the class covered least. *written*: the sets the default writes (cross-conformal, with the "
             "call). *at 1.0*: the share of each fold's held-out cells its model gives probability exactly 1.0 "
             "(float32), lowest and highest fold (seed 0).", ""]
    for kind, title in (("all", "Over all cells"), ("per_class", "Per class (`--coverage_per_class true`)")):
        lines += [f"## {title}", "",
                  "| split | cells | accuracy | pooled, all_data | lowest | pooled, average | lowest | "
                  "cross-conformal | lowest | size | written | lowest | size |" + (" at 1.0 |" if kind == "all" else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if kind == "all" else "")]
        for split, r in mean.iterrows():
            shares = frame[(frame["split"] == split)]["fold_share_at_one"].iloc[0]
            line = (f"| {names[split]} | {r.cells:.0f} | {r.accuracy:.3f} | "
                    f"{r[f'{kind}_pooled_all_data_coverage']:.3f} | {r[f'{kind}_pooled_all_data_lowest_class_coverage']:.3f} | "
                    f"{r[f'{kind}_pooled_average_coverage']:.3f} | {r[f'{kind}_pooled_average_lowest_class_coverage']:.3f} | "
                    f"**{r[f'{kind}_cross_coverage']:.3f}** | {r[f'{kind}_cross_lowest_class_coverage']:.3f} | "
                    f"{r[f'{kind}_cross_mean_set_size']:.2f} | {r[f'{kind}_written_coverage']:.3f} | "
                    f"{r[f'{kind}_written_lowest_class_coverage']:.3f} | {r[f'{kind}_written_mean_set_size']:.2f} |")
            if kind == "all":
                line += f" {min(shares):.2f}-{max(shares):.2f} |"
            lines.append(line)
        m = mean.mean()
        within = {name: int((abs(mean[f"{kind}_{name}_coverage"] - COVERAGE) <= 0.02).sum())
                  for name in ("pooled_all_data", "pooled_average", "cross")}
        below = {name: int((mean[f"{kind}_{name}_coverage"] < COVERAGE - 0.02).sum())
                 for name in ("pooled_all_data", "pooled_average", "cross")}
        lines += [f"| **mean** | | | {m[f'{kind}_pooled_all_data_coverage']:.3f} | | "
                  f"{m[f'{kind}_pooled_average_coverage']:.3f} | | **{m[f'{kind}_cross_coverage']:.3f}** | | | "
                  f"{m[f'{kind}_written_coverage']:.3f} | | |" + (" |" if kind == "all" else ""), "",
                  f"Splits within 0.02 of {COVERAGE}: pooled all_data {within['pooled_all_data']}, pooled average "
                  f"{within['pooled_average']}, cross-conformal {within['cross']} of {len(mean)}; more than 0.02 "
                  f"below it: {below['pooled_all_data']}, {below['pooled_average']}, {below['cross']}.", ""]
    return lines


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny subsample, 2 folds and 2 epochs (the test suite)")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--tag", default="conformal_holdout")
    args = parser.parse_args(argv)
    command = "python bench/conformal_holdout.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = []
    for seed in args.seeds:
        for split in args.splits:
            rows.append(measure(split, seed, args))
            r = rows[-1]
            print(f"{split:28s} seed {seed}: pooled {r['all_pooled_average_coverage']:.3f}, cross "
                  f"{r['all_cross_coverage']:.3f}, per class cross {r['per_class_cross_coverage']:.3f}", flush=True)
    frame = pd.DataFrame(rows)
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": info,
                                               "rows": frame.to_dict(orient="records")})
    write_markdown(args.out / f"{args.tag}.md", report(frame, command, info))
    return frame


if __name__ == "__main__":
    main()
