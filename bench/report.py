"""The cost of report.html at scale: page size, time to write it, time for a browser to load it.

Trains a run on generated cells (bench/generate.py; default 100,000 x 2,000 genes, 5 folds, a few epochs: the
page's size depends on the number of models, classes and map points, not on epochs), predicts the same cells,
then measures both pages: their size, the seconds scnym takes to write them (median of several writes, from
the run's own files) and the seconds headless Chromium takes to load them (median of several loads).
Writes ``bench/results/report.md`` and ``report.json``.

    python bench/report.py                       # 100k cells
    python bench/report.py --cells 20000 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, WORK, machine, provenance, run_measured, scnym_command, write_json, write_markdown  # noqa: E402,E501

REPEATS = 5


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        raise SystemExit("no headless Chromium: apt-get install chromium")
    return found


def load_seconds(page: Path) -> float:
    """Median seconds for headless Chromium to load the page and hand back its DOM (a fresh profile each time)."""
    times = []
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory(prefix="scnym-browser-") as profile:
            started = time.perf_counter()
            subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                            "--dump-dom", page.as_uri()], capture_output=True, check=True, timeout=300)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def blank_seconds() -> float:
    """The same for an empty page: the browser's own start-up, to subtract."""
    with tempfile.TemporaryDirectory(prefix="scnym-blank-") as scratch:
        page = Path(scratch) / "blank.html"
        page.write_text("<!DOCTYPE html><html><body></body></html>")
        return load_seconds(page)


def write_seconds(write, *args) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        write(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=WORK / "report")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from scnym_cli.html_report import write_prediction_report, write_run_report

    data = args.work / f"cells{args.cells}_genes2000.h5ad"
    if not data.exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "generate.py"), "--cells", str(args.cells),
                        "--genes", "2000", "--out", str(data)], check=True)
    run, predictions = args.work / "run", args.work / "predictions"
    training = run_measured([*scnym_command(), "train_tissue_independent", "--input_counts", str(data),
                             "--lower_group", "cell_type", "--out_path", str(run), "--n_folds", str(args.folds),
                             "--n_epochs", str(args.epochs), "--min_epochs", "1", "--overwrite", "true"],
                            args.work / "train.log")
    predicting = run_measured([*scnym_command(), "predict_cell_types", "--model_path", str(run), "--input_counts",
                               str(data), "--lower_group", "cell_type", "--out_path", str(predictions),
                               "--overwrite", "true"], args.work / "predict.log")
    run_summary = json.loads((run / "run_summary.json").read_text())
    prediction_summary = json.loads((predictions / "prediction_summary.json").read_text())
    blank = blank_seconds()
    pages = {}
    for name, directory, write, write_args in (
            ("training run", run, write_run_report, (run, run_summary)),
            ("prediction", predictions, write_prediction_report, (predictions, prediction_summary, "cell_type"))):
        page = directory / "report.html"
        loaded = load_seconds(page)
        pages[name] = {"bytes": page.stat().st_size, "write_seconds": round(write_seconds(write, *write_args), 3),
                       "load_seconds": round(loaded, 3), "load_seconds_minus_blank": round(loaded - blank, 3)}
    info = machine()
    payload = {"cells": args.cells, "folds": args.folds, "epochs": args.epochs, "pages": pages,
               "blank_page_load_seconds": round(blank, 3), "training": training, "prediction": predicting,
               "machine": info, "command": shlex.join(["python", "bench/report.py", *(argv or sys.argv[1:])])}
    write_json(args.out / "report.json", payload)
    lines = ["# report.html at scale", "", *provenance(payload["command"], info), "",
             f"A run on {args.cells:,} generated cells x 2,000 genes ({args.folds} folds + all_data, "
             f"{len(run_summary['classes'])} classes, {args.epochs} epochs), and its prediction of the same cells. "
             f"Medians of {REPEATS}: writing the page from the run's files, and headless Chromium loading it "
             f"(`--dump-dom`, a fresh profile each time; an empty page takes {blank:.2f} s, the browser's own "
             "start-up).", "",
             "| page | size (MB) | write (s) | browser load (s) | load minus empty page (s) |", "|---|---|---|---|---|"]
    for name, page in pages.items():
        lines.append(f"| {name} | {page['bytes'] / 1e6:.2f} | {page['write_seconds']:.2f} | "
                     f"{page['load_seconds']:.2f} | {page['load_seconds_minus_blank']:.2f} |")
    lines += ["", "Targets (issue 14): under 5 MB and under 2 s to render for a 100k-cell run. The embedding map draws "
              "a seeded sample of 5,000 cells whatever the data size, so the page does not grow with the cells."]
    write_markdown(args.out / "report.md", lines)
    return payload


if __name__ == "__main__":
    main()
