"""Accuracy of scnym on the real label-transfer splits, through the command line, several seeds.

For every split x method x seed: ``scnym train_tissue_independent`` on the reference (no
cross-validation: the query is the evaluation), ``scnym predict_cell_types`` on the query,
then accuracy, balanced accuracy, macro-F1 and ECE against the query's labels, with wall time
and peak memory of both steps. Writes ``<out>/<tag>.csv`` (one row per run), ``<tag>.json``
(rows + machine + command), ``<tag>.md`` (summary next to the peers' figures) and ``<tag>.png``.

    python bench/accuracy.py                              # all splits, methods, seeds 0 1 2
    python bench/accuracy.py --splits kang_cross_donor --seeds 0
    python bench/accuracy.py --quick --out /tmp/x         # seconds: the test suite runs this
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PEER_TABLE, RESULTS, SPLITS, WORK, machine, materialize, provenance, query_scores,  # noqa: E402
                    run_measured, scnym_command, write_json, write_markdown)

# method name -> extra training flags; QUERY is replaced by the query file, given as unlabeled
# target data (transductive, like the peers scNym 0.3.2 and scANVI)
METHODS: dict[str, list[str]] = {
    "supervised": [],
    "mixmatch": ["--unlabeled_counts", "QUERY", "--preset", "no_dan"],
    "mixmatch_dan": ["--unlabeled_counts", "QUERY", "--preset", "default"],
}
QUICK_FLAGS = ["--n_epochs", "2", "--min_epochs", "1", "--n_hidden", "32", "--batch_size", "64"]


def evaluate(predictions: Path, query: Path, label: str) -> dict:
    """Scores on the query cells of types the model knows, and how the others (novel types) were scored."""
    import anndata as ad

    table = pd.read_csv(predictions)
    truth = ad.read_h5ad(query, backed="r").obs[label].astype(str).reindex(table["cell_id"].astype(str)).to_numpy()
    classes = [c[len("prob_"):] for c in table.filter(like="prob_").columns]
    return query_scores(truth, table["predicted_label"].astype(str), table["confidence"], classes)


def shared_genes_file(reference: Path, query: Path) -> Optional[Path]:
    """Where the query holds under half of the reference's genes (the minimum overlap at prediction),
    the genes the two share, as --genes_to_use (what every peer does by intersecting); else None."""
    import anndata as ad

    reference_genes = ad.read_h5ad(reference, backed="r").var_names
    query_genes = ad.read_h5ad(query, backed="r").var_names
    shared = reference_genes[reference_genes.isin(query_genes)]
    if len(shared) >= 0.5 * len(reference_genes):
        return None
    path = reference.with_name(reference.stem + ".shared_genes.txt")
    path.write_text("\n".join(shared) + "\n")
    return path


def run(command: list[str], log_path: Path, in_process: bool) -> dict:
    """A scnym command as a process (wall time and peak memory of the whole process), or, with
    --in-process, through the same CLI inside this interpreter (no start-up; no memory figure)."""
    if not in_process:
        return run_measured(command, log_path)
    import time

    import typer

    from scnym_cli.cli import app

    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        typer.main.get_command(app).main(command[len(scnym_command()):], standalone_mode=False)
    except typer.Exit as stop:  # ScnymError: the CLI has printed it
        if stop.exit_code:
            raise RuntimeError(f"{shlex.join(command)} failed ({stop.exit_code})") from None
    return {"seconds": round(time.perf_counter() - started, 2), "peak_memory_mb": None}


def run_one(split_name: str, method: str, seed: int, args) -> dict:
    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=200 if args.quick else None)
    run_dir = args.work / "runs" / split_name / method / f"seed{seed}"
    train = [*scnym_command(), "train_tissue_independent", "--input_counts", str(reference),
             "--lower_group", split.label, "--out_path", str(run_dir / "model"), "--n_folds", "0",
             "--seed", str(seed), "--overwrite", "true", "--quiet", *METHODS[method]]
    shared = shared_genes_file(reference, query)
    if shared is not None:
        train += ["--genes_to_use", str(shared)]
    train = [str(query) if a == "QUERY" else a for a in train]
    if args.quick:
        train += QUICK_FLAGS
    if args.n_epochs:
        train += ["--n_epochs", str(args.n_epochs)]
    trained = run(train, run_dir / "train.log", args.in_process)
    predict = [*scnym_command(), "predict_cell_types", "--model_path", str(run_dir / "model"),
               "--input_counts", str(query), "--out_path", str(run_dir / "predictions"), "--overwrite", "true",
               "--write_h5ad", "false", "--quiet"]
    predicted = run(predict, run_dir / "predict.log", args.in_process)
    metrics = evaluate(run_dir / "predictions" / "predictions.csv", query, split.label)
    row = {"split": split_name, "method": method, "seed": seed, **metrics,
           "train_seconds": trained["seconds"], "train_peak_mb": trained["peak_memory_mb"],
           "predict_seconds": predicted["seconds"], "predict_peak_mb": predicted["peak_memory_mb"]}
    print(f"{split_name:20s} {method:14s} seed {seed}: balanced accuracy {metrics['balanced_accuracy']:.4f} "
          f"accuracy {metrics['accuracy']:.4f} ECE {metrics['ece']:.4f} novel AUROC {metrics['novel_auroc']:.3f} "
          f"({trained['seconds']:.0f} s)", flush=True)
    return row


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    metrics = ["balanced_accuracy", "accuracy", "macro_f1", "ece", "train_seconds", "train_peak_mb"]
    grouped = rows.groupby(["split", "method"], sort=False)[metrics]
    summary = grouped.mean().join(grouped.std(ddof=0), rsuffix="_sd").reset_index()
    summary["n_seeds"] = grouped.size().to_numpy()
    return summary


def markdown(summary: pd.DataFrame, info: dict, command: str) -> str:
    lines = ["# scnym accuracy on real label-transfer splits", "",
             *provenance(command, info, f"Python {info['python']}."), "",
             "Balanced accuracy / accuracy on the query (mean ± sd over seeds); ECE = expected calibration error. "
             "Peer columns are quoted from ../shared/data/README.md (one seed, same machine type).", "",
             "| split | method | balanced acc. | accuracy | macro-F1 | ECE | train s | peak MB | logreg | "
             "CellTypist | scNym 0.3.2 | scANVI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        peers = PEER_TABLE.get(r["split"], {})
        peer_cells = [f"{peers[p][0]:.3f} / {peers[p][1]:.3f}" if p in peers else ""
                      for p in ("logreg", "celltypist", "scnym_0.3.2", "scanvi")]
        lines.append(
            f"| {SPLITS[r['split']].description} | {r['method']} | {r['balanced_accuracy']:.3f} ± "
            f"{r['balanced_accuracy_sd']:.3f} | {r['accuracy']:.3f} ± {r['accuracy_sd']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['ece']:.3f} | {r['train_seconds']:.0f} | {r['train_peak_mb']:.0f} | " + " | ".join(peer_cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(summary["split"]))
    methods = list(dict.fromkeys(summary["method"]))
    peers = ["logreg", "celltypist", "scnym_0.3.2", "scanvi"]
    bars = methods + peers
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(splits)), 4))
    for i, name in enumerate(bars):
        values, errors = [], []
        for split in splits:
            if name in methods:
                row = summary[(summary["split"] == split) & (summary["method"] == name)]
                values.append(float(row["balanced_accuracy"].iloc[0]) if len(row) else np.nan)
                errors.append(float(row["balanced_accuracy_sd"].iloc[0]) if len(row) else 0)
            else:
                values.append(PEER_TABLE.get(split, {}).get(name, (np.nan,))[0])
                errors.append(0)
        ax.bar(np.arange(len(splits)) + i * width, values, width, yerr=errors, label=name,
               hatch="" if name in methods else "//", alpha=1.0 if name in methods else 0.6)
    ax.set_xticks(np.arange(len(splits)) + 0.4 - width / 2, [SPLITS[s].description for s in splits], fontsize=8)
    ax.set_ylabel("balanced accuracy on the query")
    ax.set_ylim(0.5, 1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("scnym (solid) vs peers (hatched, quoted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra method: a name and its training flags (QUERY = the query file), e.g. "
                             "'hvg=--n_top_genes 2000'; repeatable")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n_epochs", type=int, default=None, help="override the default (100)")
    parser.add_argument("--quick", action="store_true", help="tiny subsample and 2 epochs (for the test suite)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the CLI inside this interpreter (faster for ablations; no peak-memory figures)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--tag", default="accuracy")
    args = parser.parse_args(argv)
    command = "python bench/accuracy.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    for variant in args.variant:
        name, _, flags = variant.partition("=")
        METHODS[name.strip()] = shlex.split(flags)
        args.methods.append(name.strip())
    rows = pd.DataFrame([run_one(s, m, seed, args) for s in args.splits for m in args.methods for seed in args.seeds])
    summary = summarize(rows)
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out / f"{args.tag}.csv", index=False)
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": info,
                                               "rows": rows.to_dict(orient="records"),
                                               "summary": summary.to_dict(orient="records")})
    plot(summary, args.out / f"{args.tag}.png")
    write_markdown(args.out / f"{args.tag}.md", markdown(summary, info, command).splitlines())
    return rows


if __name__ == "__main__":
    main()
