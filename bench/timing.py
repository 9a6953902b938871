"""Wall time to a trained model: scnym's methods and every peer side by side in one run.

On one split (Kang cross-donor by default: 8.7k reference + 3.5k query cells), each tool runs as a
user runs it — its whole process (start-up, reading, training, prediction) under ``/usr/bin/time``
with the libraries' own thread choice — in interleaved rounds: every fast tool once per round, so
that a drift in the machine's speed hits all of them alike; the slow ones (the original scNym,
scANVI, scnym with the 2021 settings) run in the first round only. Rounds use seeds 0, 1, 2...,
so every run trains a model from scratch. Run it on an idle machine: the figures are wall seconds.

    python bench/timing.py                                  # 3 rounds on Kang cross-donor
    python bench/timing.py --rounds 5 --tools scnym_cli logreg

Writes ``<out>/<tag>.csv`` (one row per run), ``<tag>.json`` and ``<tag>.md`` (median, min and max of
the whole-process wall time per tool, the runner's own training seconds, peak memory, balanced
accuracy, and the ratio of each tool's median to scnym's default semi-supervised run).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SPLITS, WORK, machine, provenance, write_json, write_markdown  # noqa: E402
from peers import PEERS, Peer, peer_environment, run_one  # noqa: E402

SCNYM_2021 = Peer("scnym_cli_2021", "scnym, 2021 settings (configs/scnym_2021.txt)", "run_scnym_cli.py", None,
                  None, None, None, "max calibrated class probability",
                  flags=("-c", str(REPO / "configs" / "scnym_2021.txt")), ours=True)
TOOLS = {**{name: PEERS[name] for name in ("scnym_cli_supervised", "scnym_cli", "logreg", "celltypist", "scnym",
                                           "scanvi")}, SCNYM_2021.name: SCNYM_2021}
SLOW = {"scnym", "scanvi", "scnym_cli_2021"}   # minutes per run: the first round only
REFERENCE_TOOL = "scnym_cli"


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    ok = frame[frame["status"] == "ok"]
    table = ok.groupby("peer", sort=False).agg(
        runs=("seconds", "size"), wall_median=("seconds", "median"), wall_min=("seconds", "min"),
        wall_max=("seconds", "max"), train_median=("runner_train_s", "median"), peak_mb=("peak_mb", "max"),
        balanced_accuracy=("balanced_accuracy", "mean"))
    if REFERENCE_TOOL in table.index:
        table["vs_scnym"] = table["wall_median"] / table.loc[REFERENCE_TOOL, "wall_median"]
    return table


def markdown(table: pd.DataFrame, frame: pd.DataFrame, split: str, info: dict, command: str) -> list[str]:
    lines = ["# Wall time to a trained model", "", *provenance(command, info), "",
             f"Split: {SPLITS[split].description}. Each run is one whole process as a user runs it (start-up, "
             "reading, training, predicting the query), timed by /usr/bin/time; threads: each library's own "
             "choice (scnym: the CPUs the process may use, at most 2). Fast tools ran once per round, "
             "interleaved; the slow ones once. Train s = the runner's own figure for the training step "
             "(for scnym: the `train_tissue_independent` process, start-up included).", "",
             "| tool | runs | wall s median (min-max) | train s (median) | peak MB | balanced accuracy | "
             "wall / scnym default |", "|---|---|---|---|---|---|---|"]
    for name, row in table.iterrows():
        ratio = f"{row['vs_scnym']:.2f}" if "vs_scnym" in row and pd.notna(row["vs_scnym"]) else "–"
        train = f"{row['train_median']:.1f}" if pd.notna(row["train_median"]) else "–"
        lines.append(f"| {TOOLS[name].title} | {int(row['runs'])} | {row['wall_median']:.1f} "
                     f"({row['wall_min']:.1f}-{row['wall_max']:.1f}) | {train} | {row['peak_mb']:.0f} | "
                     f"{row['balanced_accuracy']:.3f} | {ratio} |")
    failed = frame[frame["status"] != "ok"]
    for _, row in failed.iterrows():
        lines.append(f"\nFAILED: {row['peer']} round {row['seed']}: {row.get('error')}")
    load = frame["load_1min_before"].dropna()
    if len(load):
        lines += ["", f"Load average (1 min) when runs started: {load.min():.2f}-{load.max():.2f}."]
    return lines


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="kang_cross_donor", choices=list(SPLITS))
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK / "timing")
    parser.add_argument("--tag", default="timing")
    args = parser.parse_args(argv)
    command = "python bench/timing.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    run_args = argparse.Namespace(work=args.work, quick=False, unbounded=False, resume=False)
    environment = peer_environment()
    info = machine()
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for round_number in range(args.rounds):
        for name in args.tools:
            if name in SLOW and round_number > 0:
                continue
            rows.append(run_one(args.split, TOOLS[name], round_number, run_args, environment))
            frame = pd.DataFrame(rows)
            table = summarize(frame)
            frame.drop(columns=["runner_meta", "class_sizes", "per_class_recall", "novel_called_as",
                                "reference_classes"], errors="ignore").to_csv(args.out / f"{args.tag}.csv",
                                                                              index=False)
            write_json(args.out / f"{args.tag}.json", {"command": command, "machine": info, "rows": rows,
                                                       "summary": table.reset_index().to_dict(orient="records")})
            write_markdown(args.out / f"{args.tag}.md", markdown(table, frame, args.split, info, command))
    print((args.out / f"{args.tag}.md").read_text())
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
