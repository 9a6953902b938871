"""Tissue-independent vs tissue-dependent vs tissue-specific training on real data.

No multi-tissue dataset is available offline, so a domain column plays the upper group: the
10x chemistry of the PBMC chemistries data (3 groups) and the donor of Kang et al. 2018
(8 groups). Each command runs with 5-fold cross-validation and built-in defaults; the figure is
the mean held-out balanced accuracy / accuracy over folds (pooled over groups for tissue-specific).
Writes ``<out>/tissues.json`` and ``tissues.md``.

    python bench/tissues.py
    python bench/tissues.py --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, SHARED_DATA, WORK, machine, provenance, run_measured, scnym_command,  # noqa: E402
                    write_json, write_markdown)

DATASETS = {
    "pbmc_chemistries": ("pbmc_3chemistries_small.h5ad", "cell_type", "donor"),
    "kang_donors": ("kang2018_ctrl_8donors.h5ad", "cluster_id", "sample_id"),
}
COMMANDS = ("train_tissue_independent", "train_tissue_dependent", "train_tissue_specific")


def fold_metrics(run: Path, command: str) -> dict:
    if command != "train_tissue_specific":
        folds = pd.read_csv(run / "fold_eval_acc.csv")
        return {"balanced_accuracy": folds["balanced_accuracy"].mean(), "accuracy": folds["accuracy"].mean(),
                "groups": None}
    routing = json.loads((run / "tissue_specific.json").read_text())
    pooled = pd.concat(pd.read_csv(p) for d in routing["models"].values()
                       for p in sorted((run / d).glob("fold*/predictions.csv")))
    from scnym_cli.train.metrics import classification_metrics

    m = classification_metrics(pooled["true_label"].to_numpy(), pooled["predicted_label"].to_numpy())
    return {"balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
            "groups": {"trained": list(routing["models"]), "skipped": routing["skipped"]}}


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args(argv)
    command_line = "python bench/tissues.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    quick = ["--n_epochs", "2", "--min_epochs", "1", "--n_folds", "2", "--n_hidden", "32"] if args.quick else []
    rows = []
    for dataset in args.datasets:
        file, label, group = DATASETS[dataset]
        data = SHARED_DATA / file
        if not data.exists():
            raise FileNotFoundError(f"{data} is missing: the benchmarks need ../shared/data beside the checkout")
        for command in COMMANDS:
            run = args.work / "tissues" / dataset / command
            timing = run_measured([*scnym_command(), command, "--input_counts", str(data), "--lower_group", label,
                                   "--upper_group", group, "--out_path", str(run), "--overwrite", "true", "--quiet",
                                   *quick], args.work / "tissues" / f"{dataset}_{command}.log")
            rows.append({"dataset": dataset, "upper_group": group, "command": command, **fold_metrics(run, command),
                         "seconds": timing["seconds"], "peak_mb": timing["peak_memory_mb"]})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tissues.json", {"command": command_line, "machine": info,
                                           "rows": table.to_dict(orient="records")})
    lines = ["# Tissue-aware training on real data (a domain column as the upper group)", "",
             *provenance(command_line, info), "",
             "Mean held-out balanced accuracy / accuracy over 5 folds (tissue-specific: all groups' held-out "
             "predictions pooled).", "", "| dataset (upper group) | command | balanced acc. | accuracy | seconds |",
             "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['dataset']} ({r['upper_group']}) | {r['command']} | {r['balanced_accuracy']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['seconds']:.0f} |")
    write_markdown(args.out / "tissues.md", lines)
    return table


if __name__ == "__main__":
    main()
