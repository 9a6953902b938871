#!/usr/bin/env python
"""scnym (this repository) as a peer: the same interface as ../shared/peers/run_<peer>.py.

    python bench/run_scnym_cli.py --ref ref.h5ad --query query.h5ad --label cell_type --out preds.csv [--seed N]
                                  [--supervised] [-- extra training flags]

Runs what a user runs: ``scnym train_tissue_independent`` on the reference with the defaults (the
query given as unlabeled target data, unless --supervised; no cross-validation: the query is the
evaluation), then ``scnym predict_cell_types`` on the query, each as its own process. Writes
``cell,prediction,confidence`` and ``<out>.meta.json`` with the seconds of each step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--ref", "--query", "--label", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--supervised", action="store_true", help="do not give the query as target data")
    parser.add_argument("--genes-to-use", default=None, help="a gene list for --genes_to_use")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    work = out.parent / "scnym_run"
    scnym = [sys.executable, "-m", "scnym_cli"]
    train = [*scnym, "train_tissue_independent", "--input_counts", args.ref, "--lower_group", args.label,
             "--out_path", str(work / "model"), "--n_folds", "0", "--seed", str(args.seed), "--overwrite", "true",
             "--quiet"]
    if not args.supervised:
        train += ["--unlabeled_counts", args.query]
    if args.genes_to_use:
        train += ["--genes_to_use", args.genes_to_use]
    train += [a for a in extra if a != "--"]
    predict = [*scnym, "predict_cell_types", "--model_path", str(work / "model"), "--input_counts", args.query,
               "--out_path", str(work / "predictions"), "--overwrite", "true", "--write_h5ad", "false", "--quiet"]
    started = time.perf_counter()
    subprocess.run(train, check=True)
    trained = time.perf_counter()
    subprocess.run(predict, check=True)
    finished = time.perf_counter()
    table = pd.read_csv(work / "predictions" / "predictions.csv")
    pd.DataFrame({"cell": table["cell_id"], "prediction": table["predicted_label"],
                  "confidence": table["confidence"]}).to_csv(out, index=False)
    meta = {"peer": "scnym (this repository)", "train_s": round(trained - started, 2),
            "predict_s": round(finished - trained, 2), "total_s": round(finished - started, 2),
            "command_train": train, "command_predict": predict}
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
