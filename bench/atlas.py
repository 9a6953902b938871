"""Atlas scale: training from disk and streaming prediction at 5 million cells, and how both grow from 1 million.

On generated cells (bench/generate.py: real Kang cells resampled with count noise, 2,000 genes):
- training from disk (--backed) at each size, and in memory at the smallest (the throughput to compare with),
  supervised, no folds; seconds per epoch = the last epoch's (the first pays for cold caches); peak memory of
  the process;
- streaming prediction of every cell of each size with the smallest size's model: cells per second (model
  loading to the last output block) and peak memory; predictions.csv only, in float32 and the default
  precision, then as a user gets it by default (scored against the query's labels, with the annotated copy).
Writes ``bench/results/atlas.md`` and ``atlas.json``.

    python bench/atlas.py                                  # 1M and 5M cells (~17 GB of h5ad under bench/work)
    python bench/atlas.py --sizes 20000 60000 --out /tmp/x  # minutes
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
from scale import ensure_data  # noqa: E402

# the targets (issue 14), checked in the results file
TARGET_PEAK_MB = 3000
TARGET_THROUGHPUT_SHARE = 0.7       # from disk at the largest size vs in memory at the smallest
TARGET_PREDICTION_CELLS_PER_S = 60_000
# "flat": prediction's peak memory at the largest size at most this much above the smallest's
TARGET_FLAT_GROWTH = 0.05


def train(data: Path, run: Path, epochs: int, *extra: str) -> dict:
    command = [*scnym_command(), "train_tissue_independent", "--input_counts", str(data), "--lower_group",
               "cell_type", "--out_path", str(run), "--n_folds", "0", "--n_epochs", str(epochs), "--min_epochs", "1",
               "--patience", "0", "--overwrite", "true", "--quiet", "--num_threads", "2",
               "--checkpoint_epochs", "0", "--checkpoint_minutes", "0", *extra]
    measured = run_measured(command, run.with_suffix(".log"))
    log = pd.read_csv(run / "all_data" / "all_data_log.csv")
    n_fit = json.loads((run / "all_data" / "model.json").read_text())["training"]["n_fit"]
    seconds = float(log["seconds"].iloc[-1])
    return {"seconds_per_epoch": round(seconds, 2), "cells_per_second": round(n_fit / seconds),
            "peak_memory_mb": measured["peak_memory_mb"], "total_seconds": measured["seconds"]}


# prediction runs: (mode, flags); the last two are the default precision, the last as a user gets it by default
PREDICTIONS = (("streamed from disk, float32", ["--write_h5ad", "false", "--inference_precision", "float32"]),
               ("streamed from disk, auto", ["--write_h5ad", "false"]),
               ("streamed from disk, auto, labeled, annotated copy", ["--lower_group", "cell_type"]))


def predict(model: Path, data: Path, out: Path, flags: list[str]) -> dict:
    command = [*scnym_command(), "predict_cell_types", "--model_path", str(model), "--input_counts", str(data),
               "--out_path", str(out), "--overwrite", "true", "--quiet", "--num_threads", "2", *flags]
    measured = run_measured(command, out.with_suffix(".log"))
    summary = json.loads((out / "prediction_summary.json").read_text())
    return {"seconds": summary["seconds"], "cells_per_second": round(summary["n_cells"] / summary["seconds"]),
            "peak_memory_mb": measured["peak_memory_mb"], "total_seconds": measured["seconds"],
            "inference_precision": summary.get("inference_precision")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 5_000_000])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=WORK / "atlas")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command_line = "python bench/atlas.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    sizes = sorted(args.sizes)
    rows = []
    smallest_model = None
    for cells in sizes:
        data = ensure_data(cells, 2000, 0, args.work / "data")
        modes = [("from disk (--backed)", ["--backed", "true"])]
        if cells == sizes[0]:
            modes.insert(0, ("in memory", []))
        for mode, extra in modes:
            run = args.work / "runs" / f"{cells}_{'disk' if extra else 'memory'}"
            rows.append({"cells": cells, "task": "training", "mode": mode, **train(data, run, args.epochs, *extra)})
            print(rows[-1], flush=True)
            if cells == sizes[0] and extra:
                smallest_model = run
        assert smallest_model is not None
        for index, (mode, flags) in enumerate(PREDICTIONS):   # auto: bfloat16 where the CPU has its instructions
            result = predict(smallest_model, data, args.work / "predictions" / f"{cells}_{index}", flags)
            rows.append({"cells": cells, "task": "prediction", "mode": mode, **result})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    info = machine()
    write_json(args.out / "atlas.json", {"command": command_line, "machine": info,
                                         "rows": table.to_dict(orient="records")})
    largest, smallest = sizes[-1], sizes[0]

    def pick(cells, task, mode):
        return table[(table["cells"] == cells) & (table["task"] == task) & (table["mode"] == mode)].iloc[0]

    disk_large = pick(largest, "training", "from disk (--backed)")
    memory_small = pick(smallest, "training", "in memory")
    mode, annotated = PREDICTIONS[1][0], PREDICTIONS[2][0]
    predict_small, predict_large = pick(smallest, "prediction", mode), pick(largest, "prediction", mode)
    annotated_small, annotated_large = pick(smallest, "prediction", annotated), pick(largest, "prediction", annotated)

    def growth(small, large) -> str:
        rise = large["peak_memory_mb"] / small["peak_memory_mb"] - 1
        return (f"{small['peak_memory_mb']:.0f} MB at {smallest:,} and {large['peak_memory_mb']:.0f} MB at "
                f"{largest:,} cells, {rise:+.1%} (target flat, within {TARGET_FLAT_GROWTH:.0%}: "
                f"{'met' if rise <= TARGET_FLAT_GROWTH else 'missed'})")

    share = disk_large["cells_per_second"] / memory_small["cells_per_second"]
    lines = ["# Atlas scale: training from disk and streaming prediction up to 5 million cells", "",
             *provenance(command_line, info, f"Supervised, 2,000 genes, batch 256, {args.epochs} epochs, no folds; "
                                             "seconds per epoch = the last epoch's; peak memory of the process."),
             "", "| cells | task | mode | s / epoch (training) or s (prediction) | cells / s | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        seconds = r["seconds_per_epoch"] if r["task"] == "training" else r["seconds"]
        lines.append(f"| {r['cells']:,} | {r['task']} | {r['mode']} | {seconds:.1f} | {r['cells_per_second']:,} | "
                     f"{r['peak_memory_mb']:.0f} |")
    lines += ["", "## Against the targets (issue 14)", "",
              f"- Training from disk at {largest:,} cells: peak {disk_large['peak_memory_mb']:.0f} MB "
              f"(target under {TARGET_PEAK_MB:,}: {'met' if disk_large['peak_memory_mb'] < TARGET_PEAK_MB else 'missed'}).",
              f"- Its throughput is {share:.0%} of in-memory training at {smallest:,} cells "
              f"({disk_large['cells_per_second']:,} vs {memory_small['cells_per_second']:,} cells/s; target within 30%: "
              f"{'met' if share >= TARGET_THROUGHPUT_SHARE else 'missed'}).",
              f"- Streaming prediction (default precision, here {predict_large['inference_precision']}): "
              f"{predict_large['cells_per_second']:,} cells/s at {largest:,} cells "
              f"(target {TARGET_PREDICTION_CELLS_PER_S:,}: "
              f"{'met' if predict_large['cells_per_second'] >= TARGET_PREDICTION_CELLS_PER_S else 'missed'}); peak "
              f"memory {growth(predict_small, predict_large)}.",
              f"- As a user gets it by default (scored against the labels, annotated copy written): "
              f"{annotated_large['cells_per_second']:,} cells/s at {largest:,} cells; peak memory "
              f"{growth(annotated_small, annotated_large)}."]
    write_markdown(args.out / "atlas.md", lines)
    return {"rows": rows}


if __name__ == "__main__":
    main()
