"""Trust (issue 11): fold ensembles, calibration and conformal prediction sets on every visible split.

For every split and seed, the default semi-supervised run with 5-fold cross-validation is trained (the
query as target data, as a user would), then the query is predicted with each ``--ensemble`` choice
(all_data: the single final model; folds: the 5 fold models; all: the 6 models averaged), with
``--coverage 0.9`` sets over all cells and per class (Mondrian). Figures:

* balanced accuracy and ECE of each ensemble choice on the query (cells of types the reference has), and the
  ECE a perfectly calibrated model would show at the same confidences and query size (the sampling floor);
* conformal coverage on cross-validation: the out-of-fold predictions, each fold's sets calibrated on the
  other folds (what a query like the reference gets), overall and per class;
* coverage and mean set size on the (shifted) query, without and with weighting by a domain classifier
  p(query | x) on the all_data embedding (weighted split conformal, Tibshirani et al. 2019).

    python bench/trust.py --num_threads 1 [--splits ...] [--seeds 0 1 2]
    python bench/trust.py --train_only --splits A B --num_threads 1   # two of these side by side on 2 cores

Writes bench/results/trust.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Optional
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import QUICK_FLAGS, defaults_fingerprint, run  # noqa: E402
from common import (RESULTS, SPLITS, WORK, machine, materialize, provenance, scnym_command,  # noqa: E402
                    shared_genes_file, write_json, write_markdown)

COVERAGE = 0.9
N_FOLDS = 5
ENSEMBLES = ["all_data", "folds", "all"]


def default_run_command(reference: Path, query: Path, label: str, out_path: Path, seed: int, args,
                        n_folds: int = N_FOLDS) -> list[str]:
    """The default semi-supervised k-fold training of ``reference`` with ``query`` as target data (the genes both
    measure, when they differ); quick flags and threads as the benchmark's arguments say."""
    command = [*scnym_command(), "train_tissue_independent", "--input_counts", str(reference),
               "--lower_group", label, "--out_path", str(out_path), "--n_folds", str(n_folds),
               "--seed", str(seed), "--overwrite", "true", "--quiet", "--unlabeled_counts", str(query)]
    shared = shared_genes_file(reference, query)
    if shared is not None:
        command += ["--genes_to_use", str(shared)]
    if args.quick:
        command += QUICK_FLAGS
    if args.num_threads:
        command += ["--num_threads", str(args.num_threads)]
    return command


def train_once(command: list[str], run_dir: Path, args) -> Optional[float]:
    """Run ``command`` unless run_dir holds a run of the same command under today's training defaults; its
    seconds when it ran."""
    stamp = {"command": shlex.join(command[len(scnym_command()):]), "defaults": defaults_fingerprint()}
    marker = run_dir / "trained.json"
    if marker.exists() and json.loads(marker.read_text()) | {"seconds": None} == stamp | {"seconds": None}:
        return None
    trained = run(command, run_dir / "train.log", args.in_process)
    write_json(marker, {**stamp, "seconds": trained["seconds"]})
    return trained["seconds"]


def train(split_name: str, seed: int, args) -> tuple[Path, Path, Path]:
    """(run directory, reference, query) of the split's default semi-supervised run with 5 folds (trained once;
    reused while its command and scnym's training defaults are unchanged)."""
    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=200 if args.quick else None)
    run_dir = args.work / "trust" / split_name / f"seed{seed}"
    command = default_run_command(reference, query, split.label, run_dir / "model", seed, args)
    seconds = train_once(command, run_dir, args)
    if seconds is not None:
        print(f"{split_name:28s} seed {seed}: trained in {seconds:.0f} s", flush=True)
    return run_dir, reference, query


def predict(run_dir: Path, data: Path, name: str, args, *flags: str) -> Path:
    """The predictions of ``data`` by the run with ``flags``, in run_dir/<name> (made once per training)."""
    return predict_once(run_dir / "model", data, run_dir / name, run_dir / "trained.json", args, *flags)


def predict_once(model: Path, data: Path, out: Path, trained_marker: Path, args, *flags: str) -> Path:
    """``predict_cell_types`` of ``data`` by ``model`` with ``flags`` into ``out``, unless ``out`` already holds
    predictions newer than the training's marker (:func:`train_once`)."""
    predictions = out / "predictions.csv"
    if not (predictions.exists() and predictions.stat().st_mtime > trained_marker.stat().st_mtime):
        command = [*scnym_command(), "predict_cell_types", "--model_path", str(model), "--input_counts", str(data),
                   "--out_path", str(out), "--overwrite", "true", "--write_h5ad", "false", "--quiet", *flags]
        if args.num_threads:
            command += ["--num_threads", str(args.num_threads)]
        run(command, out.with_suffix(".log"), args.in_process)
    return out


def read_predictions(out: Path, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False, na_values={"novelty": [""],
                                                                                   "disagreement": [""]})
    return table, table[[f"prob_{c}" for c in classes]].to_numpy()


def set_matrix(table: pd.DataFrame, classes: list[str]) -> np.ndarray:
    members = [set(s.split("|")) if s else set() for s in table["prediction_set"].astype(str)]
    return np.array([[c in m for c in classes] for m in members], dtype=bool)


def query_sets_figures(sets: np.ndarray, codes: np.ndarray, n_classes: int) -> dict:
    from scnym_cli.train.conformal import coverage_summary

    known = codes >= 0
    return coverage_summary(sets[known], codes[known], n_classes)


def measure(split_name: str, seed: int, run_dir: Path, reference: Path, query: Path, args) -> dict:
    """Every figure of one trained run (see the module docstring)."""
    import anndata as ad
    from sklearn.metrics import roc_auc_score

    from scnym_cli.train.conformal import held_out_fold_sets
    from scnym_cli.train.metrics import (calibration_error_floor, calibration_error_of, classification_metrics,
                                         confidence_bins)

    split = SPLITS[split_name]
    classes = json.loads((run_dir / "model" / "all_data" / "model.json").read_text())["classes"]
    row: dict = {"split": split_name, "seed": seed}
    truth = ad.read_h5ad(query, backed="r").obs[split.label].astype(str)
    codes = pd.Index(classes).get_indexer(truth.to_numpy())
    known = codes >= 0

    # ensembles: accuracy and calibration on the query's known types
    tables = {}
    for ensemble in ENSEMBLES:
        out = predict(run_dir, query, f"query_{ensemble}", args, "--ensemble", ensemble, "--coverage", str(COVERAGE))
        table, probabilities = read_predictions(out, classes)
        assert (table["cell_id"].astype(str).to_numpy() == truth.index.astype(str)).all()
        tables[ensemble] = (table, probabilities)
        called = np.asarray(classes)[probabilities.argmax(1)]
        metrics = classification_metrics(truth.to_numpy()[known], called[known])
        row[f"{ensemble}_balanced_accuracy"] = metrics["balanced_accuracy"]
        row[f"{ensemble}_accuracy"] = metrics["accuracy"]
        confidence, correct = probabilities.max(1)[known], called[known] == truth.to_numpy()[known]
        bins = confidence_bins(confidence, correct, 15)
        row[f"{ensemble}_ece"] = calibration_error_of(bins)
        # what a perfectly calibrated model would show at these confidences and this many cells
        row[f"{ensemble}_ece_floor"] = calibration_error_floor(bins)
        row[f"{ensemble}_overconfidence"] = float(confidence.mean() - correct.mean())
        for name, value in query_sets_figures(set_matrix(table, classes), codes, len(classes)).items():
            row[f"query_{ensemble}_{name}"] = value
    out = predict(run_dir, query, "query_all_per_class", args, "--coverage", str(COVERAGE), "--coverage_per_class",
                  "true")
    table, _ = read_predictions(out, classes)
    for name, value in query_sets_figures(set_matrix(table, classes), codes, len(classes)).items():
        row[f"query_per_class_{name}"] = value

    # novelty among the query's types the reference lacks: disagreement of the ensemble vs its other scores
    table, probabilities = tables["all"]
    if known.any() and (~known).any():
        for name, score in (("1 - confidence", 1 - probabilities.max(1)), ("disagreement", table["disagreement"]),
                            ("novelty", table["novelty"])):
            row[f"novel_auroc_{name}"] = float(roc_auc_score(~known, np.asarray(score, dtype=float)))

    # cross-validation: each fold's held-out cells, calibrated on the other folds
    held_out = pd.concat([pd.read_csv(run_dir / "model" / f"fold{k:02d}" / "predictions.csv",
                                      dtype={"cell_id": str}).assign(fold=k)
                          for k in range(N_FOLDS)])
    cv_codes = pd.Index(classes).get_indexer(held_out["true_label"].astype(str))
    cv_probabilities = held_out[[f"prob_{c}" for c in classes]].to_numpy()
    # (scnym's sets hold the predicted class too; "exact": plain split conformal, empty sets allowed)
    for per_class in (False, True):
        for with_top_class, prefix in ((True, "cv"), (False, "cv_exact")):
            sets = held_out_fold_sets(cv_probabilities, cv_codes, held_out["fold"].to_numpy(), COVERAGE, per_class,
                                      with_top_class=with_top_class)
            for name, value in query_sets_figures(sets, cv_codes, len(classes)).items():
                row[f"{prefix}_{'per_class' if per_class else 'all'}_{name}"] = value
    row["cv_accuracy"] = float((cv_probabilities.argmax(1) == cv_codes).mean())

    # weighted conformal under covariate shift (--weighted_sets): the calibration cells weighted by
    # p(query | x) / p(reference | x) of a domain classifier on the all_data embedding
    for per_class, name in ((False, "weighted"), (True, "weighted_per_class")):
        out = predict(run_dir, query, f"query_all_{name}", args, "--coverage", str(COVERAGE), "--weighted_sets",
                      "true", *(["--coverage_per_class", "true"] if per_class else []))
        table, _ = read_predictions(out, classes)
        for figure, value in query_sets_figures(set_matrix(table, classes), codes, len(classes)).items():
            row[f"query_{name}_{figure}"] = value
        if not per_class:
            weighted = json.loads((out / "prediction_summary.json").read_text())["calibration"]["weighted"]
            row["effective_calibration_cells"] = weighted["effective_cells"]
    return row


def report(frame: pd.DataFrame, command: str, info: dict) -> list[str]:
    """The markdown summary: per split (mean over seeds), then the targets of issue 11."""
    mean = frame.groupby("split", sort=False).mean(numeric_only=True)
    seeds = frame.groupby("split", sort=False)["seed"].nunique()
    names = {s: SPLITS[s].description for s in mean.index}
    lines = ["# Trust: fold ensembles, calibration, conformal prediction sets", "", *provenance(command, info), "",
             f"The default semi-supervised run with {N_FOLDS}-fold cross-validation (the query as target data), per "
             f"split; mean over seeds ({', '.join(map(str, sorted(frame['seed'].unique())))}). Balanced accuracy and "
             "ECE on the query cells of types the reference has; sets at coverage "
             f"{COVERAGE}. *floor*: the ECE a perfectly calibrated model would show at the default's confidences "
             "and the query's size (median of simulated label draws; sampling alone puts it there); "
             "*conf. − acc.*: the default's mean confidence minus its accuracy (> 0: overconfident).", "",
             "## Ensembles", "",
             "| split | seeds | bal. acc. all_data | folds | all (default) | Δ all − all_data | ECE all_data | folds | all "
             "| floor | conf. − acc. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for split, r in mean.iterrows():
        lines.append(f"| {names[split]} | {seeds[split]} | {r.all_data_balanced_accuracy:.3f} | "
                     f"{r.folds_balanced_accuracy:.3f} | {r.all_balanced_accuracy:.3f} | "
                     f"{r.all_balanced_accuracy - r.all_data_balanced_accuracy:+.3f} | {r.all_data_ece:.3f} | "
                     f"{r.folds_ece:.3f} | {r.all_ece:.3f} | {r.all_ece_floor:.3f} | {r.all_overconfidence:+.3f} |")
    m = mean.mean()
    lines.append(f"| **mean** | | {m.all_data_balanced_accuracy:.3f} | {m.folds_balanced_accuracy:.3f} | "
                 f"{m.all_balanced_accuracy:.3f} | {m.all_balanced_accuracy - m.all_data_balanced_accuracy:+.3f} | "
                 f"{m.all_data_ece:.3f} | {m.folds_ece:.3f} | {m.all_ece:.3f} | {m.all_ece_floor:.3f} | "
                 f"{m.all_overconfidence:+.3f} |")
    lines += ["", "## Conformal sets on cross-validation", "",
              "Each fold's held-out cells get sets calibrated on the other folds' held-out cells: the coverage "
              "pooled split conformal gets on a query exchangeable with the reference (the default ensemble's "
              "cross-conformal sets need cells no model was fit on: conformal_holdout.md). *exact*: plain split "
              "conformal (a set may be empty); "
              "*scnym*: the sets scnym writes, which also hold the predicted class (never empty). *lowest*: the class "
              "covered least. *accuracy*: of the held-out calls (a set holding the call covers at least that).", "",
              "| split | accuracy | exact: coverage | lowest class | scnym: coverage | lowest class | mean size | "
              "per class, exact: coverage | lowest class | per class, scnym: coverage | lowest class | mean size |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for split, r in mean.iterrows():
        lines.append(f"| {names[split]} | {r.cv_accuracy:.3f} | {r.cv_exact_all_coverage:.3f} | "
                     f"{r.cv_exact_all_lowest_class_coverage:.3f} | {r.cv_all_coverage:.3f} | "
                     f"{r.cv_all_lowest_class_coverage:.3f} | {r.cv_all_mean_set_size:.2f} | "
                     f"{r.cv_exact_per_class_coverage:.3f} | {r.cv_exact_per_class_lowest_class_coverage:.3f} | "
                     f"{r.cv_per_class_coverage:.3f} | {r.cv_per_class_lowest_class_coverage:.3f} | "
                     f"{r.cv_per_class_mean_set_size:.2f} |")
    lines += ["", "## Conformal sets on the shifted query", "",
              "Calibrated on the folds' held-out reference cells; the query is another donor, chemistry, stimulus, "
              "study or species, so exchangeability is broken. *weighted*: calibration cells weighted by "
              "p(query | x) / p(reference | x) of a logistic-regression domain classifier on the all_data embedding "
              "(`--weighted_sets true`: 2,000 calibration cells against 2,000 query cells, cross-fitted), the test "
              "cell's weight on +inf (Tibshirani et al. 2019); *n eff*: the effective number of calibration cells "
              "under those weights (few: sets near-full).", "",
              "| split | all_data: coverage | size | all: coverage | size | lowest class | per class: coverage | "
              "lowest class | size | weighted: coverage | size | lowest class | n eff | weighted per class: coverage "
              "| lowest class | size |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for split, r in mean.iterrows():
        lines.append(f"| {names[split]} | {r.query_all_data_coverage:.3f} | {r.query_all_data_mean_set_size:.2f} | "
                     f"{r.query_all_coverage:.3f} | {r.query_all_mean_set_size:.2f} | "
                     f"{r.query_all_lowest_class_coverage:.3f} | {r.query_per_class_coverage:.3f} | "
                     f"{r.query_per_class_lowest_class_coverage:.3f} | {r.query_per_class_mean_set_size:.2f} | "
                     f"{r.query_weighted_coverage:.3f} | {r.query_weighted_mean_set_size:.2f} | "
                     f"{r.query_weighted_lowest_class_coverage:.3f} | {r.effective_calibration_cells:.0f} | "
                     f"{r.query_weighted_per_class_coverage:.3f} | "
                     f"{r.query_weighted_per_class_lowest_class_coverage:.3f} | "
                     f"{r.query_weighted_per_class_mean_set_size:.2f} |")
    lines.append(f"| **mean** | {m.query_all_data_coverage:.3f} | {m.query_all_data_mean_set_size:.2f} | "
                 f"{m.query_all_coverage:.3f} | {m.query_all_mean_set_size:.2f} | {m.query_all_lowest_class_coverage:.3f} | "
                 f"{m.query_per_class_coverage:.3f} | {m.query_per_class_lowest_class_coverage:.3f} | "
                 f"{m.query_per_class_mean_set_size:.2f} | {m.query_weighted_coverage:.3f} | "
                 f"{m.query_weighted_mean_set_size:.2f} | {m.query_weighted_lowest_class_coverage:.3f} | | "
                 f"{m.query_weighted_per_class_coverage:.3f} | {m.query_weighted_per_class_lowest_class_coverage:.3f} | "
                 f"{m.query_weighted_per_class_mean_set_size:.2f} |")
    novel = [c for c in mean.columns if c.startswith("novel_auroc_")]
    if novel:
        lines += ["", "## Types the reference lacks", "",
                  "AUROC of each score for the query cells of types the reference lacks against the known ones "
                  "(ensemble all).", "", "| split | " + " | ".join(c[len("novel_auroc_"):] for c in novel) + " |",
                  "|---" * (1 + len(novel)) + "|"]
        for split, r in mean[mean[novel].notna().any(axis=1)].iterrows():
            lines.append(f"| {names[split]} | " + " | ".join(f"{r[c]:.3f}" for c in novel) + " |")
    delta = mean.all_balanced_accuracy - mean.all_data_balanced_accuracy
    lines += ["", "## Targets (issue 11)", "",
              f"- Ensemble balanced accuracy >= single all_data model on average: {m.all_balanced_accuracy:.3f} vs "
              f"{m.all_data_balanced_accuracy:.3f} ({'met' if delta.mean() >= 0 else 'missed'}; worst split "
              f"{delta.min():+.3f}, {names[delta.idxmin()]}).",
              f"- ECE <= 0.02 on every visible query (ensemble all): {(mean.all_ece <= 0.02).sum()} of {len(mean)} "
              f"splits; worst {mean.all_ece.max():.3f} ({names[mean.all_ece.idxmax()]}). More than 0.01 above what "
              f"a calibrated model would show at the query's size: "
              + (", ".join(f"{names[s]} ({r.all_ece:.3f} vs {r.all_ece_floor:.3f}, conf. − acc. "
                           f"{r.all_overconfidence:+.3f})" for s, r in mean.iterrows()
                           if r.all_ece > r.all_ece_floor + 0.01) or "none") + ".",
              f"- Coverage on cross-validation within 0.02 of {COVERAGE} (exact split conformal): "
              f"{((mean.cv_exact_all_coverage - COVERAGE).abs() <= 0.02).sum()} of {len(mean)} splits "
              f"({mean.cv_exact_all_coverage.min():.3f}..{mean.cv_exact_all_coverage.max():.3f}); scnym's sets (holding "
              f"the call): {(mean.cv_all_coverage >= COVERAGE - 0.02).sum()} of {len(mean)} splits at or above "
              f"{COVERAGE - 0.02:.2f} ({mean.cv_all_coverage.min():.3f}..{mean.cv_all_coverage.max():.3f}). Every "
              f"class >= {COVERAGE - 0.05:.2f} with per-class sets: "
              f"{(mean.cv_per_class_lowest_class_coverage >= COVERAGE - 0.05).sum()} of {len(mean)} splits (lowest "
              f"{mean.cv_per_class_lowest_class_coverage.min():.3f}).",
              f"- Shifted queries: coverage {m.query_all_coverage:.3f} without weighting (mean set size "
              f"{m.query_all_mean_set_size:.2f}), {m.query_weighted_coverage:.3f} with ({m.query_weighted_mean_set_size:.2f}); "
              f"splits at or above {COVERAGE - 0.02:.2f}: {(mean.query_all_coverage >= COVERAGE - 0.02).sum()} and "
              f"{(mean.query_weighted_coverage >= COVERAGE - 0.02).sum()} of {len(mean)} (target {COVERAGE})."]
    return lines


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark over the trust runs (this one and bench/precision.py): which splits and seeds,
    threads, quick mode, in process, where results and runs go."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny subsample and 2 epochs (for the test suite)")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    return parser


def main(argv=None) -> pd.DataFrame:
    parser = run_arguments(__doc__)
    parser.add_argument("--train_only", action="store_true", help="train the runs, report nothing")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:   # seed by seed: a first seed over every split is ready early
        for split in args.splits:
            run_dir, reference, query = train(split, seed, args)
            if not args.train_only:
                rows.append(measure(split, seed, run_dir, reference, query, args))
                print(f"{split:28s} seed {seed}: " + ", ".join(
                    f"{k} {rows[-1][k]:.3f}" for k in ("all_data_balanced_accuracy", "all_balanced_accuracy",
                                                       "all_ece", "cv_all_coverage", "query_all_coverage",
                                                       "query_weighted_coverage")), flush=True)
    if args.train_only:
        return pd.DataFrame()
    command = "python bench/trust.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    frame = pd.DataFrame(rows)
    info = machine()
    write_json(args.out / "trust.json", {"command": command, "machine": info, "rows": frame.to_dict(orient="records")})
    write_markdown(args.out / "trust.md", report(frame, command, info))
    return frame


if __name__ == "__main__":
    main()
