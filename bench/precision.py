"""Prediction in bfloat16 against float32: what ``--inference_precision`` changes, on every visible split.

The models are bench/trust.py's runs (default semi-supervised training, 5 folds, seeds 0-2), used as they are
when they exist (trained by it when missing). Each run's query is predicted twice with the run's default ensemble (the folds and all_data), once
with the matrix products in float32 and once in bfloat16, and the two compared: the share of cells whose label
changes, the largest change of a probability, of the confidence and of the novelty score, and balanced accuracy
and ECE on the query's known types with each. Writes ``bench/results/precision.md`` and ``precision.json``.

    python bench/precision.py                          # 11 splits x 3 seeds (~10 min once the runs exist)
    python bench/precision.py --quick --splits kang_ctrl_to_stim --seeds 0 --out /tmp/x
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SPLITS, machine, materialize, provenance, write_json, write_markdown  # noqa: E402
from trust import predict, read_predictions, run_arguments, train  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def measure(split_name: str, seed: int, args) -> dict:
    import anndata as ad

    from scnym_cli.train.metrics import calibration_error, classification_metrics

    split = SPLITS[split_name]
    run_dir = args.work / "trust" / split_name / f"seed{seed}"
    if (run_dir / "model" / "run_summary.json").exists() and (run_dir / "trained.json").exists():
        # any finished run of bench/trust.py will do: both precisions are compared on the same model
        _, query = materialize(split, args.work / "data", max_cells=200 if args.quick else None)
    else:
        run_dir, _, query = train(split_name, seed, args)
    classes = json.loads((run_dir / "model" / "all_data" / "model.json").read_text())["classes"]
    truth = ad.read_h5ad(query, backed="r").obs[split.label].astype(str).to_numpy()
    known = np.isin(truth, classes)
    row: dict = {"split": split_name, "seed": seed, "n_cells": len(truth)}
    tables = {}
    for precision in PRECISIONS:
        out = predict(run_dir, query, f"query_{precision}", args, "--inference_precision", precision)
        table, probabilities = read_predictions(out, classes)
        summary = json.loads((out / "prediction_summary.json").read_text())
        assert summary["inference_precision"] == precision, summary["inference_precision"]
        tables[precision] = (table, probabilities)
        called = np.asarray(classes)[probabilities.argmax(1)]
        row[f"{precision}_balanced_accuracy"] = classification_metrics(truth[known], called[known])["balanced_accuracy"]
        row[f"{precision}_ece"] = calibration_error(probabilities.max(1)[known], called[known] == truth[known])
        row[f"{precision}_seconds"] = summary["seconds"]
    (a, pa), (b, pb) = tables["float32"], tables["bfloat16"]
    row["labels_changed"] = float((a["predicted_label"].to_numpy() != b["predicted_label"].to_numpy()).mean())
    row["max_probability_change"] = float(np.abs(pa - pb).max())
    row["max_confidence_change"] = float((a["confidence"] - b["confidence"]).abs().max())
    novelty = (a["novelty"] - b["novelty"]).abs()
    row["max_novelty_change"], row["median_novelty_change"] = float(novelty.max()), float(novelty.median())
    row["novelty_spread"] = float(a["novelty"].quantile(0.9) - a["novelty"].quantile(0.1))
    return row


def report(frame: pd.DataFrame, command: str, info: dict) -> list[str]:
    lines = ["# Prediction in bfloat16 against float32 (`--inference_precision`)", "",
             *provenance(command, info, "Models: bench/trust.py's runs (default semi-supervised, 5 folds); each "
                                        "query predicted by the run's default ensemble (5 folds + all_data) in "
                                        "float32 and in bfloat16. Balanced accuracy and ECE on the query's known "
                                        "types; 'seconds': model loading to the last output."),
             "", "| split | seeds | cells | labels changed | max prob. change | max novelty change (spread 10-90%) "
                 "| balanced acc. float32 / bfloat16 | ECE float32 / bfloat16 | seconds float32 / bfloat16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, rows in frame.groupby("split", sort=False):
        m = rows.mean(numeric_only=True)
        lines.append(
            f"| {SPLITS[split].description} | {len(rows)} | {int(m.n_cells):,} | {m.labels_changed:.3%} | "
            f"{rows.max_probability_change.max():.4f} | {rows.max_novelty_change.max():.4f} ({m.novelty_spread:.3f}) | "
            f"{m.float32_balanced_accuracy:.4f} / {m.bfloat16_balanced_accuracy:.4f} | {m.float32_ece:.4f} / "
            f"{m.bfloat16_ece:.4f} | {m.float32_seconds:.1f} / {m.bfloat16_seconds:.1f} |")
    m = frame.mean(numeric_only=True)
    cells = frame.n_cells.sum()
    changed = (frame.labels_changed * frame.n_cells).sum()
    lines += ["", "## Summary", "",
              f"- Labels changed: {changed:.0f} of {cells:,} predicted cells ({changed / cells:.3%}) over "
              f"{len(frame)} runs; the largest probability change {frame.max_probability_change.max():.4f}.",
              f"- Balanced accuracy: mean {m.float32_balanced_accuracy:.4f} in float32, "
              f"{m.bfloat16_balanced_accuracy:.4f} in bfloat16 (largest difference of one run "
              f"{(frame.float32_balanced_accuracy - frame.bfloat16_balanced_accuracy).abs().max():.4f}); ECE "
              f"{m.float32_ece:.4f} and {m.bfloat16_ece:.4f}.",
              f"- Novelty: median change {frame.median_novelty_change.median():.5f}, largest "
              f"{frame.max_novelty_change.max():.4f}, against a spread (10th to 90th percentile) of "
              f"{frame.novelty_spread.median():.3f}.",
              f"- Time on these small queries (model loading included, 6 models): {m.float32_seconds:.1f} s in float32, "
              f"{m.bfloat16_seconds:.1f} s in bfloat16; at atlas scale see atlas.md."]
    return lines


def main(argv=None) -> pd.DataFrame:
    args = run_arguments(__doc__).parse_args(argv)
    rows = []
    for seed in args.seeds:
        for split in args.splits:
            rows.append(measure(split, seed, args))
            print(f"{split:28s} seed {seed}: labels changed {rows[-1]['labels_changed']:.4%}, balanced accuracy "
                  f"{rows[-1]['float32_balanced_accuracy']:.4f} / {rows[-1]['bfloat16_balanced_accuracy']:.4f}",
                  flush=True)
    command = "python bench/precision.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    frame = pd.DataFrame(rows)
    info = machine()
    write_json(args.out / "precision.json", {"command": command, "machine": info,
                                             "rows": frame.to_dict(orient="records")})
    write_markdown(args.out / "precision.md", report(frame, command, info))
    return frame


if __name__ == "__main__":
    main()
