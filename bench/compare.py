"""Two runs of bench/accuracy.py side by side: the same split, method and seed, before and after a change.

A restructuring that should not change behaviour is checked this way: labels (accuracy, balanced
accuracy) must match to the last digit on CPU at the same seed and thread count; calibration (ECE) may
move when the change touches temperatures.

    python bench/compare.py BEFORE.csv AFTER.csv [--seeds 0] > bench/results/NAME.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

KEYS = ["split", "method", "seed"]
FIGURES = ["accuracy", "balanced_accuracy", "ece"]


def compare(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """One row per run present in both: each figure before, after and the difference."""
    joined = before[KEYS + FIGURES].merge(after[KEYS + FIGURES], on=KEYS, suffixes=("_before", "_after"))
    for figure in FIGURES:
        joined[f"{figure}_change"] = joined[f"{figure}_after"] - joined[f"{figure}_before"]
    return joined.sort_values(KEYS).reset_index(drop=True)


def markdown(table: pd.DataFrame, before: Path, after: Path) -> str:
    lines = [f"Runs of bench/accuracy.py compared: `{before}` (before) and `{after}` (after), "
             f"matched by split, method and seed ({len(table)} runs).", "",
             "| split | method | seed | bal. acc. before | after | Δ | accuracy Δ | ECE before | after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.split} | {row.method} | {row.seed} | {row.balanced_accuracy_before:.4f} | "
                     f"{row.balanced_accuracy_after:.4f} | {row.balanced_accuracy_change:+.4f} | "
                     f"{row.accuracy_change:+.4f} | {row.ece_before:.4f} | {row.ece_after:.4f} |")
    same = int((table["balanced_accuracy_change"].abs() < 1e-9).sum())
    lines += ["", f"Balanced accuracy identical on {same} of {len(table)} runs; largest change "
              f"{table['balanced_accuracy_change'].abs().max():.4f}; mean ECE {table['ece_before'].mean():.4f} -> "
              f"{table['ece_after'].mean():.4f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--seeds", nargs="*", type=int, default=None)
    args = parser.parse_args(argv)
    before, after = pd.read_csv(args.before), pd.read_csv(args.after)
    if args.seeds is not None:
        before, after = before[before["seed"].isin(args.seeds)], after[after["seed"].isin(args.seeds)]
    sys.stdout.write(markdown(compare(before, after), args.before, args.after))


if __name__ == "__main__":
    main()
