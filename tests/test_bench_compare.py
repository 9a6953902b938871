"""bench/compare.py: two accuracy runs matched by split, method and seed."""

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from compare import compare, markdown  # noqa: E402


def test_runs_are_matched_and_changes_reported():
    rows = [("a", "supervised", 0, 0.9, 0.8, 0.02), ("a", "supervised", 1, 0.9, 0.8, 0.02),
            ("b", "semi_supervised", 0, 0.7, 0.6, 0.05)]
    columns = ["split", "method", "seed", "accuracy", "balanced_accuracy", "ece"]
    before = pd.DataFrame(rows, columns=columns)
    after = before.iloc[[0, 2]].copy()
    after.loc[after["split"] == "b", "balanced_accuracy"] = 0.65
    table = compare(before, after)
    assert len(table) == 2 and list(table["split"]) == ["a", "b"]
    assert table["balanced_accuracy_change"].round(6).tolist() == [0.0, 0.05]
    text = markdown(table, Path("x.csv"), Path("y.csv"))
    assert "identical on 1 of 2 runs" in text and "largest change 0.0500" in text
