"""Do the marker methods find known biology? Kang et al. 2018 control PBMCs (8 donors).

Trains a supervised model on all cells (built-in defaults, no cross-validation), runs
``scnym find_cell_type_markers`` with both methods, and reports for each class with textbook
markers whether one of them is in the class's top 20 (of 1,287 genes), and at which rank.
Writes ``<out>/markers.json``, ``markers.md`` and copies the heat map to ``markers_heatmap.png``.

    python bench/markers.py
    python bench/markers.py --quick --out /tmp/x     # seconds (test suite)
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, SHARED_DATA, WORK, machine, provenance, run_measured, scnym_command,  # noqa: E402
                    write_json, write_markdown)

KNOWN_MARKERS = {
    "B cells": ["CD79A", "MS4A1"],
    "CD14+ Monocytes": ["LYZ", "S100A8", "S100A9", "CD14"],
    "NK cells": ["GNLY", "NKG7", "GZMB"],
    "FCGR3A+ Monocytes": ["FCGR3A", "MS4A7"],
    "Megakaryocytes": ["PPBP", "PF4"],
    "CD8 T cells": ["CD8A", "CD8B"],
    "Dendritic cells": ["FCER1A", "CST3"],
}
TOP = 20


def best_ranks(table: pd.DataFrame, name: str, markers: list[str]) -> dict:
    of_class = table[table["class"] == name].set_index("gene")["rank"]
    found = {g: int(of_class[g]) for g in markers if g in of_class.index}
    best = min(found.values()) if found else None
    return {"markers_in_data": sorted(found), "best_rank": best, "hit": best is not None and best <= TOP,
            "best_marker": min(found, key=found.get) if found else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args(argv)
    command = "python bench/markers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    data = SHARED_DATA / "kang2018_ctrl_8donors.h5ad"
    if not data.exists():
        raise FileNotFoundError(f"{data} is missing: the benchmarks need ../shared/data beside the checkout")
    work = args.work / "markers"
    quick = ["--n_epochs", "3", "--min_epochs", "1"] if args.quick else []
    train = run_measured([*scnym_command(), "train_tissue_independent", "--input_counts", str(data),
                          "--lower_group", "cluster_id", "--out_path", str(work / "model"), "--n_folds", "0",
                          "--overwrite", "true", "--quiet", *quick], work / "train.log")
    markers_flags = ["--optimization_steps", "30", "--eg_samples", "8", "--eg_max_cells", "50"] if args.quick else []
    found = run_measured([*scnym_command(), "find_cell_type_markers", "--model_path", str(work / "model"),
                          "--input_counts", str(data), "--lower_group", "cluster_id", "--out_path",
                          str(work / "markers"), "--overwrite", "true", "--quiet", *markers_flags],
                         work / "markers.log")
    tables = {method: pd.read_csv(work / "markers" / f"{method}_markers.csv")
              for method in ("expected_gradients", "input_optimization")}
    results = {method: {name: best_ranks(table, name, markers) for name, markers in KNOWN_MARKERS.items()}
               for method, table in tables.items()}
    # classes whose known markers are not among the file's genes cannot be hit: not counted
    scored = [name for name in KNOWN_MARKERS if results["expected_gradients"][name]["markers_in_data"]]
    hit_rates = {m: sum(per[name]["hit"] for name in scored) / len(scored) for m, per in results.items()}
    info = machine()
    payload = {"command": command, "machine": info, "top": TOP, "known_markers": KNOWN_MARKERS, "scored_classes": scored,
               "results": results, "hit_rates": hit_rates, "train": train, "markers": found}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "markers.json", payload)
    lines = ["# Marker genes found by scnym on Kang et al. 2018 control PBMCs", "",
             *provenance(command, info, "Model: supervised, defaults, all 12,261 cells; markers with default "
                                        f"settings ({found['seconds']:.0f} s)."), "",
             f"Best rank of a known marker in each class's ranking (1,287 genes; hit = within the top {TOP}).", "",
             "| class | known markers | expected gradients | input optimization |", "|---|---|---|---|"]
    for name, markers in KNOWN_MARKERS.items():
        cells = []
        for method in ("expected_gradients", "input_optimization"):
            r = results[method][name]
            cells.append(f"{r['best_marker']} #{r['best_rank']}" + (" ✓" if r["hit"] else "")
                         if r["best_rank"] else "not in data")
        lines.append(f"| {name} | {', '.join(markers)} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Hit rate: expected gradients {hit_rates['expected_gradients']:.0%}, input optimization "
              f"{hit_rates['input_optimization']:.0%}, over the {len(scored)} classes whose known markers are among "
              f"the file's genes ({', '.join(n for n in KNOWN_MARKERS if n not in scored)}: not in the data)."]
    shutil.copy(work / "markers" / "marker_heatmap.png", args.out / "markers_heatmap.png")
    write_markdown(args.out / "markers.md", lines)
    return payload


if __name__ == "__main__":
    main()
