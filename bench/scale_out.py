"""Scaling out: training from disk (--backed) and data-parallel training with torchrun.

On the scale benchmark's datasets (bench/scale.py generates them under bench/work/scale/data):
- training memory and speed from disk vs in memory, supervised, at each size;
- training throughput of 1 process vs 2 processes (torchrun, gloo on CPU; 1 thread each, so the
  two processes use the two cores one process would use with 2 threads) on the 100k-cell set.
Writes ``<out>/scale_out.json`` and ``scale_out.md``.

    python bench/scale_out.py
    python bench/scale_out.py --quick --out /tmp/x     # seconds (test suite)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, WORK, machine, provenance, run_measured, scnym_command, write_json, write_markdown  # noqa: E402,E501
from scale import ensure_data, epoch_seconds  # noqa: E402


def train(data: Path, run: Path, args, *extra, launcher=None, threads: int = 2) -> dict:
    command = [*(launcher or scnym_command()), "train_tissue_independent", "--input_counts", str(data),
               "--lower_group", "cell_type", "--out_path", str(run), "--n_folds", "0", "--n_epochs",
               str(args.epochs), "--min_epochs", "1", "--patience", "0", "--overwrite", "true", "--quiet",
               "--num_threads", str(threads), *extra]
    measured = run_measured(command, run.with_suffix(".log"))
    seconds = epoch_seconds(run)
    n_fit = json.loads((run / "all_data" / "model.json").read_text())["training"]["n_fit"]
    return {"seconds_per_epoch": round(seconds, 3), "cells_per_second": round(n_fit / seconds),
            "peak_memory_mb": measured["peak_memory_mb"], "total_seconds": measured["seconds"]}


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--parallel_size", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK / "scale")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.parallel_size, args.epochs = [3000], 3000, 2
    command_line = "python bench/scale_out.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = []
    for cells in args.sizes:
        data = ensure_data(cells, 2000, 0, args.work / "data")
        for mode, extra in (("in memory", []), ("from disk (--backed)", ["--backed", "true"])):
            result = train(data, args.work / "runs_out" / f"{cells}_{'disk' if extra else 'memory'}", args, *extra)
            rows.append({"cells": cells, "experiment": "memory", "mode": mode, **result})
            print(rows[-1], flush=True)
    data = ensure_data(args.parallel_size, 2000, 0, args.work / "data")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "scnym_cli"]
    for mode, launcher, threads in (("1 process, 2 threads", None, 2), ("2 processes (torchrun), 1 thread each",
                                                                         torchrun, 1)):
        result = train(data, args.work / "runs_out" / f"parallel_{threads}", args, launcher=launcher, threads=threads)
        rows.append({"cells": args.parallel_size, "experiment": "data parallel", "mode": mode, **result})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "scale_out.json", {"command": command_line, "machine": info,
                                             "rows": table.to_dict(orient="records")})
    lines = ["# Scaling out: training from disk, data-parallel training", "",
             *provenance(command_line, info, f"Supervised, 2,000 genes, {args.epochs} epochs; seconds per epoch = "
                                             "median after the first; peak memory of the largest process."), "",
             "| cells | experiment | mode | s / epoch | cells / s | peak memory (MB) |", "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['cells']:,} | {r['experiment']} | {r['mode']} | {r['seconds_per_epoch']:.2f} | "
                     f"{r['cells_per_second']:,} | {r['peak_memory_mb']:.0f} |")
    write_markdown(args.out / "scale_out.md", lines)
    return table


if __name__ == "__main__":
    main()
