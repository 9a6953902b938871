"""Speed and memory at atlas scale: training cost per epoch, prediction throughput, peak memory.

Datasets (bench/generate.py, cached under --work): 10k, 100k and 1M cells x 2,000 genes (real Kang
PBMCs resampled with count noise) and 100k x 20,000 genes (CellBench); semi-supervised runs use a
target set a tenth the size (another seed). For each dataset, through the command line:

- supervised and semi-supervised (MixMatch + adversary) training for ``--epochs`` epochs, no
  cross-validation: seconds per epoch (median over epochs after the first; at least 10 epochs up to
  10,000 cells), cells/s, peak memory, and achieved FLOP/s of the dense layers;
- prediction of the whole file (streamed from disk): cells/s and peak memory.

It also measures this machine's matrix-multiply ceiling (FLOP/s, torch, all threads) and, when the
original scNym 0.3.2 is installed (bench/peers.py --install), its seconds per epoch on the 10k and
100k datasets with the same architecture, batch size, preset and genes, in the same run.
Writes ``<out>/scale.json``, ``scale.md`` and ``scale.png``.

    python bench/scale.py                           # all sizes (about an hour on 2 cores)
    python bench/scale.py --sizes 10000 100000      # a subset
    python bench/scale.py --quick --out /tmp/x      # seconds (test suite)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, WORK, machine, provenance, run_measured, scnym_command, write_json,  # noqa: E402
                    write_markdown)
from generate import generate  # noqa: E402
from peers import PEER_SCRIPTS, PEERS, peer_python  # noqa: E402

N_HIDDEN, N_CLASSES, BATCH = 256, 8, 256
SMALL = 10_000  # cells


def matmul_ceiling(seconds: float = 2.0) -> dict:
    """Best sustained FLOP/s of float32 matrix products, large square and layer-shaped."""
    import torch

    results = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "layer_256x2000x256": (256, 2000, 256)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        results[name] = 2 * m * k * n * count / (time.perf_counter() - started)
    results["threads"] = torch.get_num_threads()
    return results


def training_flops_per_labeled_cell(n_genes: int, semi_supervised: bool, n_layers: int = 2) -> float:
    """Dense-layer FLOPs per labeled cell per epoch (2 per multiply-add).

    A forward pass costs F1 = 2 G H in the first layer and Fr = 2 (H H (n_layers - 1) + H C) after it;
    a backward pass costs F1 in the first layer (weight gradient only: the input needs none) and
    2 Fr after it. Semi-supervised, each labeled batch comes with an equal target batch: a teacher
    forward on the target, student forward + backward on the labeled and target mixes, and the
    adversary's forward + backward of the embedding on both (its small head ignored).
    """
    first = 2.0 * n_genes * N_HIDDEN
    rest = 2.0 * (N_HIDDEN * N_HIDDEN * (n_layers - 1) + N_HIDDEN * N_CLASSES)
    rest_embed = 2.0 * N_HIDDEN * N_HIDDEN * (n_layers - 1)
    train_step = 2 * first + 3 * rest
    if not semi_supervised:
        return train_step
    return (first + rest) + 2 * train_step + 2 * (2 * first + 3 * rest_embed)


def ensure_data(cells: int, genes: int, seed: int, work: Path) -> Path:
    path = work / f"cells{cells}_genes{genes}_seed{seed}.h5ad"
    if not path.exists():
        generate(cells, genes, path, source="kang" if genes <= 2000 else "cellbench", seed=seed)
    return path


def epoch_seconds(run: Path) -> float:
    log = pd.read_csv(run / "all_data" / "all_data_log.csv")
    later = log["seconds"].iloc[1:] if len(log) > 1 else log["seconds"]
    return float(later.median())


def cached(args, tag: str, measure) -> dict:
    """A case's measurements, reused from <work>/cases/<tag>.json with --resume."""
    path = args.work / "cases" / f"{tag}.json"
    if args.resume and path.exists():
        return {**json.loads(path.read_text()), "reused": True}
    row = measure()
    if row is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
    return row


def best_ceiling(args) -> dict:
    """The matmul ceiling; with --resume, the best of this and earlier measurements in --work (a ceiling
    is a maximum: a measurement taken while something else ran is lower, never higher)."""
    measured = matmul_ceiling(0.5 if args.quick else 3.0)
    path = args.work / "cases" / "matmul_ceiling.json"
    if args.resume and path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("threads") == measured["threads"]:
            measured = {key: max(value, earlier.get(key, value)) for key, value in measured.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(measured))
    return measured


def train_case(data: Path, target: Path | None, cells: int, genes: int, args, tag: str, extra=()) -> dict:
    return cached(args, tag, lambda: _train_case(data, target, cells, genes, args, tag, extra))


def _train_case(data: Path, target: Path | None, cells: int, genes: int, args, tag: str, extra=()) -> dict:
    run = args.work / "runs" / tag
    # epochs of small sets last about a second: more of them, so that one hiccup cannot move the median
    epochs = args.epochs if cells > SMALL or args.quick else max(args.epochs, 10)
    command = [*scnym_command(), "train_tissue_independent", "--input_counts", str(data), "--lower_group",
               "cell_type", "--out_path", str(run), "--n_folds", "0", "--n_epochs", str(epochs),
               "--min_epochs", "1", "--patience", "0", "--overwrite", "true", "--quiet"]
    if target is not None:
        command += ["--unlabeled_counts", str(target), "--preset", "no_new_identity"]
    command += list(extra)
    measured = run_measured(command, args.work / "logs" / f"{tag}.log")
    seconds = epoch_seconds(run)
    labeled = json.loads((run / "all_data" / "model.json").read_text())["training"]["n_fit"]
    n_layers = int(dict(zip(extra[::2], extra[1::2])).get("--n_layers", 2))
    flops = training_flops_per_labeled_cell(genes, target is not None, n_layers) * labeled
    return {"case": tag, "cells": cells, "genes": genes, "mode": "semi-supervised" if target else "supervised",
            "seconds_per_epoch": round(seconds, 3), "cells_per_second": round(labeled / seconds),
            "achieved_gflops": round(flops / seconds / 1e9, 1), "peak_memory_mb": measured["peak_memory_mb"],
            "total_seconds": measured["seconds"]}


def predict_case(data: Path, model_run: Path, cells: int, genes: int, args, tag: str) -> dict:
    return cached(args, tag, lambda: _predict_case(data, model_run, cells, genes, args, tag))


def _predict_case(data: Path, model_run: Path, cells: int, genes: int, args, tag: str) -> dict:
    out = args.work / "runs" / f"{tag}_predictions"
    measured = run_measured([*scnym_command(), "predict_cell_types", "--model_path", str(model_run),
                             "--input_counts", str(data), "--out_path", str(out), "--overwrite", "true",
                             "--write_h5ad", "false", "--quiet"], args.work / "logs" / f"{tag}_predict.log")
    summary = json.loads((out / "prediction_summary.json").read_text())
    return {"case": tag, "cells": cells, "genes": genes, "mode": "prediction",
            "seconds": summary["seconds"], "cells_per_second": round(cells / summary["seconds"]),
            "peak_memory_mb": measured["peak_memory_mb"], "total_seconds": measured["seconds"]}


def scnym_032_case(data: Path, target: Path, cells: int, genes: int, args) -> dict | None:
    """The original scNym 0.3.2 (peer venv) with our architecture, batch size and preset.

    Its per-epoch time is (train time of a 3-epoch run - that of a 1-epoch run) / 2, both from its own
    timer around training (loading, normalization and prediction excluded). It fits on 81% of the
    cells (a 90/10 split, then another 90/10 inside fit_model), so speed is compared per labeled cell.
    """
    peer = PEERS["scnym"]
    python, runner = peer_python(peer), PEER_SCRIPTS / peer.runner
    if not python.exists():
        return None
    runs = {}
    for epochs in (1, 3):
        out = args.work / "scnym032" / f"{cells}x{genes}_e{epochs}"
        measured = run_measured(
            [str(python), str(runner), "--ref", str(data), "--query", str(target), "--label",
             "cell_type", "--out", str(out / "preds.csv"), "--n-epochs", str(epochs), "--batch-size", str(BATCH),
             "--config", "no_new_identity"], args.work / "logs" / f"scnym032_{cells}x{genes}_e{epochs}.log")
        meta = json.loads((out / "preds.meta.json").read_text())
        if meta["n_genes"] != genes:
            raise RuntimeError(f"scNym used {meta['n_genes']} genes, not {genes}: reference and target differ")
        runs[epochs] = {**meta, "peak_memory_mb": measured["peak_memory_mb"]}
    seconds = (runs[3]["train_s"] - runs[1]["train_s"]) / 2
    labeled = int(0.9 * int(0.9 * cells))
    flops = training_flops_per_labeled_cell(genes, True, 3) * labeled
    return {"case": f"{cells}x{genes}_scnym_0.3.2", "cells": cells, "genes": genes, "mode": "semi-supervised",
            "seconds_per_epoch": round(seconds, 3), "cells_per_second": round(labeled / seconds),
            "achieved_gflops": round(flops / seconds / 1e9, 1), "peak_memory_mb": runs[3]["peak_memory_mb"],
            "train_seconds_1_epoch": runs[1]["train_s"], "train_seconds_3_epochs": runs[3]["train_s"],
            "load_seconds": runs[3]["load_prep_s"]}


def plot(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_predict) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in (("supervised", "o"), ("semi-supervised", "s")):
        part = rows[(rows["mode"] == mode) & (rows["genes"] == 2000)]
        ax_train.loglog(part["cells"], part["seconds_per_epoch"], marker=marker, label=f"{mode}, 2,000 genes")
        wide = rows[(rows["mode"] == mode) & (rows["genes"] > 2000)]
        ax_train.scatter(wide["cells"], wide["seconds_per_epoch"], marker="x", s=60,
                         label=f"{mode}, 20,000 genes")
    ax_train.set_xlabel("cells")
    ax_train.set_ylabel("seconds per epoch")
    ax_train.legend(fontsize=7)
    ax_train.set_title("training cost grows linearly with cells")
    part = rows[rows["mode"] == "prediction"]
    ax_predict.semilogx(part[part["genes"] == 2000]["cells"], part[part["genes"] == 2000]["peak_memory_mb"], "o-",
                        label="peak memory (MB), 2,000 genes")
    ax_predict.set_xlabel("cells")
    ax_predict.set_ylabel("peak memory of prediction (MB)")
    twin = ax_predict.twinx()
    twin.semilogx(part[part["genes"] == 2000]["cells"], part[part["genes"] == 2000]["cells_per_second"], "s--",
                  color="tab:orange", label="cells/s")
    twin.set_ylabel("cells per second")
    ax_predict.set_title("prediction streams: memory flat in cells")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def achieved_gflops(row: dict) -> float:
    n_layers = 3 if str(row.get("case", "")).endswith(("like_scnym", "scnym_0.3.2")) else 2
    return round(training_flops_per_labeled_cell(row["genes"], row["mode"] == "semi-supervised", n_layers)
                 * row["cells_per_second"] / 1e9, 1)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--wide", nargs="*", type=int, default=[100_000], help="cells of the 20,000-gene sets")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no_scnym", action="store_true", help="skip the scNym 0.3.2 comparison")
    parser.add_argument("--scnym_sizes", nargs="*", type=int, default=[10_000, 100_000],
                        help="sizes (among --sizes) at which scNym 0.3.2 is timed beside scnym")
    parser.add_argument("--quick", action="store_true", help="2,000 cells, 2 epochs, no scNym (test suite)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK / "scale")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the measurements of cases already measured (<work>/cases/*.json)")
    parser.add_argument("--render", type=Path, default=None,
                        help="rebuild scale.md / scale.png from this scale.json (FLOP/s recomputed), run nothing")
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
        pairs = payload.get("scnym_0.3.2_comparison", [])
        for row in payload["rows"] + [pair[side] for pair in pairs for side in ("scnym", "scnym_0.3.2")]:
            if row["mode"] != "prediction":
                row["achieved_gflops"] = achieved_gflops(row)
        return report(pd.DataFrame(payload["rows"]), payload["matmul_ceiling"], pairs, payload["machine"],
                      payload["command"], args.out)
    if args.quick:
        args.sizes, args.wide, args.epochs, args.no_scnym = [2000], [], 2, True
    command_line = "python bench/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    ceiling = best_ceiling(args)
    rows = []
    cases = [(n, 2000) for n in args.sizes] + [(n, 20000) for n in args.wide]
    for cells, genes in cases:
        data = ensure_data(cells, genes, 0, args.work / "data")
        target = ensure_data(max(cells // 10, 100), genes, 1, args.work / "data")
        tag = f"{cells}x{genes}"
        rows.append(train_case(data, None, cells, genes, args, f"{tag}_supervised"))
        rows.append(train_case(data, target, cells, genes, args, f"{tag}_semi_supervised"))
        rows.append(predict_case(data, args.work / "runs" / f"{tag}_supervised", cells, genes, args, tag))
        for row in rows[-3:]:
            print(row, flush=True)
    table = pd.DataFrame(rows)
    comparison = []
    for cells in [] if args.no_scnym else [n for n in args.scnym_sizes if n in args.sizes]:
        data = args.work / "data" / f"cells{cells}_genes2000_seed0.h5ad"
        target = args.work / "data" / f"cells{max(cells // 10, 100)}_genes2000_seed1.h5ad"
        theirs = cached(args, f"{cells}x2000_scnym_0.3.2",
                        lambda d=data, t=target, n=cells: scnym_032_case(d, t, n, 2000, args))
        if theirs is None:
            break
        # scNym 0.3.2's CellTypeCLF(n_layers=2) has 3 hidden layers (input, middle, n_layers - 1 more)
        ours = train_case(data, target, cells, 2000, args, f"{cells}x2000_like_scnym", ["--n_layers", "3"])
        comparison.append({"cells": cells, "scnym_0.3.2": theirs, "scnym": ours})
        print(comparison[-1], flush=True)
    return report(table, ceiling, comparison, machine(), command_line, args.out)


def report(table: pd.DataFrame, ceiling: dict, comparison: list, info: dict, command_line: str,
           out: Path) -> pd.DataFrame:
    """scale.json, scale.md and scale.png."""
    best = max(v for k, v in ceiling.items() if k != "threads")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scale.json", {"command": command_line, "machine": info, "matmul_ceiling": ceiling,
                                         "rows": table.to_dict(orient="records"), "scnym_0.3.2_comparison": comparison})
    lines = ["# scnym at scale: training and prediction cost, peak memory", "",
             *provenance(command_line, info), "",
             f"Matrix-multiply ceiling (float32, {ceiling['threads']} threads): "
             f"{ceiling['square_2048'] / 1e9:.1f} GFLOP/s on 2048^3, {ceiling['layer_256x2000x256'] / 1e9:.1f} "
             "GFLOP/s on the first layer's shape (256 x 2000 x 256).", "",
             "| data (cells x genes) | mode | s / epoch | cells / s | GFLOP/s (dense layers) | % of ceiling | "
             "peak memory (MB) |", "|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        if r.get("reused") is True:
            r = r.copy()
            r["mode"] = f"{r['mode']} *"
        if str(r["mode"]).startswith("prediction"):
            lines.append(f"| {r['cells']:,} x {r['genes']:,} | prediction (streamed) | {r['seconds']:.1f} s total | "
                         f"{r['cells_per_second']:,} | | | {r['peak_memory_mb']:.0f} |")
        else:
            lines.append(f"| {r['cells']:,} x {r['genes']:,} | {r['mode']} | {r['seconds_per_epoch']:.2f} | "
                         f"{r['cells_per_second']:,} | {r['achieved_gflops']} | {100 * r['achieved_gflops'] * 1e9 / best:.0f} | "
                         f"{r['peak_memory_mb']:.0f} |")
    if "reused" in table and table["reused"].eq(True).any():
        lines += ["", "\\* measured by an earlier run of this script in the same session (same data and code path; "
                      "`--resume` reused the measurement)."]
    if comparison:
        lines += ["", "## Against the original scNym 0.3.2, same run", "",
                  f"Same data files (target: a tenth as many cells, another seed, the same 2,000 genes), preset "
                  f"no_new_identity (MixMatch + domain adversary), batch {BATCH}, 3 hidden layers of {N_HIDDEN} "
                  "(scNym's CellTypeCLF; scnym `--n_layers 3`), CPU. scNym's seconds per epoch = (its training "
                  "timer at 3 epochs - at 1 epoch) / 2; it fits on 81% of the cells, scnym on 90%, so the "
                  "speed-up compares labeled cells per second.", "",
                  "| cells | tool | s / epoch | labeled cells / s | GFLOP/s | % of ceiling | peak memory (MB) |",
                  "|---|---|---|---|---|---|---|"]
        for pair in comparison:
            for name in ("scnym_0.3.2", "scnym"):
                r = pair[name]
                lines.append(f"| {pair['cells']:,} | {'scNym 0.3.2' if name != 'scnym' else 'scnym'} | "
                             f"{r['seconds_per_epoch']:.2f} | {r['cells_per_second']:,} | {r['achieved_gflops']} | "
                             f"{100 * r['achieved_gflops'] * 1e9 / best:.0f} | {r['peak_memory_mb']:.0f} |")
            speedup = pair["scnym"]["cells_per_second"] / pair["scnym_0.3.2"]["cells_per_second"]
            lines.append(f"| {pair['cells']:,} | **speed-up** | | **{speedup:.1f}x** | | | |")
    plot(table, out / "scale.png")
    write_markdown(out / "scale.md", lines)
    return table


if __name__ == "__main__":
    main()
