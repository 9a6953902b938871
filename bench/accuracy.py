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
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PEER_TABLE, REPO, RESULTS, SPLITS, WORK, machine, materialize, provenance, query_scores,  # noqa: E402
                    run_measured, scnym_command, shared_genes_file, write_json, write_markdown)

# method name -> extra training flags; QUERY is replaced by the query file, given as unlabeled
# target data (transductive, like the peers scNym 0.3.2 and scANVI)
METHODS: dict[str, list[str]] = {
    "supervised": [],
    "semi_supervised": ["--unlabeled_counts", "QUERY"],
    "scnym_2021_supervised": ["-c", str(REPO / "configs" / "scnym_2021.txt")],
    "scnym_2021": ["--unlabeled_counts", "QUERY", "-c", str(REPO / "configs" / "scnym_2021.txt")],
}
# One change each to the semi-supervised defaults (bench/results/ablation.md): name -> (flags, what it tries)
ABLATIONS: dict[str, tuple[list[str], str]] = {
    "every_gene": (["--n_top_genes", "none"], "every shared gene instead of the 2,000 most variable"),
    "reference_genes": (["--shared_genes", "false"], "the reference's genes, those the target lacks zero-filled"),
    "target_balance": (["--balance_target_classes", "true"], "target cells drawn class-balanced by pseudolabel"),
    "distribution_alignment": (["--pseudolabel_alignment", "true"], "distribution alignment (ReMixMatch)"),
    "no_gate": (["--pseudolabel_min_confidence", "0", "--adaptive_thresholds", "false"],
                "every target cell pseudolabelled, mixed and aligned (no FlexMatch thresholds)"),
    "confidence_gate": (["--adaptive_thresholds", "false", "--dan_use_conf_pseudolabels", "true"],
                        "one fixed gate: MixMatch and the adversary only on target cells guessed with "
                        "confidence >= 0.9"),
    "last_epoch": (["--selection_metric", "last"], "the last epoch kept instead of the lowest selection loss"),
    "conditional_adversary": (["--dan_conditional", "true"], "class-conditional adversary (CDAN)"),
    "unbalanced_labeled": (["--balance_classes", "false"], "labeled cells drawn as they come, not class-balanced"),
    "domain_batch_norm": (["--domain_batch_norm", "true"], "domain-specific batch norm (DSBN)"),
    "no_adversary": (["--dan_max_weight", "0"], "MixMatch only"),
    "unmixed_adversary": (["--dan_on_mixes", "false"], "the adversary on a second forward pass of unmixed cells"),
}
for _name, (_flags, _) in ABLATIONS.items():
    METHODS[_name] = ["--unlabeled_counts", "QUERY", *_flags]
QUICK_FLAGS = ["--n_epochs", "2", "--min_epochs", "1", "--n_hidden", "32", "--batch_size", "64"]


def evaluate(predictions: Path, query: Path, label: str) -> dict:
    """Scores on the query cells of types the model knows, and how the others (novel types) were scored."""
    import anndata as ad

    table = pd.read_csv(predictions)
    truth = ad.read_h5ad(query, backed="r").obs[label].astype(str).reindex(table["cell_id"].astype(str)).to_numpy()
    classes = [c[len("prob_"):] for c in table.filter(like="prob_").columns]
    return query_scores(truth, table["predicted_label"].astype(str), table["confidence"], classes)


def run(command: list[str], log_path: Path, in_process: bool) -> dict:
    """A scnym command as a process (wall time and peak memory of the whole process), or, with
    --in-process, through the same CLI inside this interpreter (no start-up; no memory figure)."""
    if not in_process:
        return run_measured(command, log_path)
    import time

    import typer

    from scnym_cli.cli import app

    from scnym_cli.train.checkpoint import StopRequest

    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    StopRequest.last_request = None   # a request of an earlier command in this process is not this one's
    try:
        typer.main.get_command(app).main(command[len(scnym_command()):], standalone_mode=False)
    except typer.Exit as stop:  # ScnymError: the CLI has printed it
        if stop.exit_code and not StopRequest.last_request:
            raise RuntimeError(f"{shlex.join(command)} failed ({stop.exit_code})") from None
    finally:
        # a training run takes SIGTERM / SIGUSR1 as "checkpoint and stop": the benchmark stops with it, even
        # when the run had finished before it could stop (kill or pkill of a benchmark ends it)
        if StopRequest.last_request:
            raise KeyboardInterrupt(f"{StopRequest.last_request} during {shlex.join(command)}")
    return {"seconds": round(time.perf_counter() - started, 2), "peak_memory_mb": None}


def defaults_fingerprint(command: str = "train_tissue_independent") -> str:
    """A digest of scnym's default settings for ``command``: a run is reused (--resume) only if its command
    *and* the defaults it ran under are today's, since the same command means another model once a default
    changes."""
    import hashlib

    from scnym_cli.config import CONFIG_KEYS, Config, describe, render_key_value

    # the keys the command reads: a prediction-only key (a new output option) does not change a trained model
    keys = [k for k in CONFIG_KEYS if command in describe(k)["commands"]]
    return hashlib.sha256(render_key_value(Config(), keys, with_help=False).encode()).hexdigest()[:12]


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
    if args.num_threads:
        train += ["--num_threads", str(args.num_threads)]
    if args.resume and (run_dir / "row.json").exists():
        previous = json.loads((run_dir / "row.json").read_text())
        if (previous.get("command") == shlex.join(train[len(scnym_command()):])
                and previous.get("defaults") == defaults_fingerprint()):
            print(f"{split_name:20s} {method:22s} seed {seed}: reused {run_dir}", flush=True)
            # scored afresh from the run's predictions (the scoring may have grown since)
            return {**previous, **evaluate(run_dir / "predictions" / "predictions.csv", query, split.label)}
    if args.reuse_only:
        return None
    trained = run(train, run_dir / "train.log", args.in_process)
    predict = [*scnym_command(), "predict_cell_types", "--model_path", str(run_dir / "model"),
               "--input_counts", str(query), "--out_path", str(run_dir / "predictions"), "--overwrite", "true",
               "--write_h5ad", "false", "--quiet"]
    predicted = run(predict, run_dir / "predict.log", args.in_process)
    metrics = evaluate(run_dir / "predictions" / "predictions.csv", query, split.label)
    row = {"split": split_name, "method": method, "seed": seed, **metrics,
           "train_seconds": trained["seconds"], "train_peak_mb": trained["peak_memory_mb"],
           "predict_seconds": predicted["seconds"], "predict_peak_mb": predicted["peak_memory_mb"],
           "in_process": bool(args.in_process), "command": shlex.join(train[len(scnym_command()):]),
           "defaults": defaults_fingerprint()}
    write_json(run_dir / "row.json", row)
    print(f"{split_name:20s} {method:22s} seed {seed}: balanced accuracy {metrics['balanced_accuracy']:.4f} "
          f"accuracy {metrics['accuracy']:.4f} ECE {metrics['ece']:.4f} novel AUROC {metrics['novel_auroc']:.3f} "
          f"({trained['seconds']:.0f} s)", flush=True)
    return row


METRICS = ["balanced_accuracy", "accuracy", "macro_f1", "ece", "novel_auroc", "train_seconds", "train_peak_mb"]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    grouped = rows.groupby(["split", "method"], sort=False)[METRICS]
    summary = grouped.mean().join(grouped.std(ddof=0), rsuffix="_sd").reset_index()
    summary["n_seeds"] = grouped.size().to_numpy()
    return summary


PEER_COLUMNS = {"logreg": "logistic regression", "celltypist": "CellTypist 1.7.1", "scnym": "scNym 0.3.2",
                "scanvi": "scANVI 1.4.2"}


def measured_peers(path: Path) -> pd.DataFrame:
    """Balanced accuracy of the peers per split (mean over their seeds), from bench/peers.py's CSV; empty when
    that file is absent. Splits the peers were not run on fall back to the figures quoted in
    ../shared/data/README.md (marked *q*)."""
    frame = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["split", "peer", "status"])
    frame = frame[(frame["status"] == "ok") & frame["peer"].isin(list(PEER_COLUMNS))]
    return frame.groupby(["split", "peer"])["balanced_accuracy"].mean().unstack("peer")


def per_class_recall(rows: pd.DataFrame, peer_rows: list[dict], methods: list[str]) -> list[str]:
    """Recall of every query type per method (mean over seeds) and peer: what explains a gap."""
    lines = ["", "## Per-class recall on the query", "",
             "Mean over seeds (peers: over the seeds they ran); n = query cells of the type. Types the reference "
             "lacks (*novel*) cannot be recalled; no method calls cells Unknown by default."]
    peers = pd.DataFrame([r for r in peer_rows if r.get("status") == "ok" and r.get("peer") in PEER_COLUMNS])
    for split in dict.fromkeys(rows["split"]):
        mine = rows[(rows["split"] == split) & rows["method"].isin(methods)]
        if not len(mine):
            continue
        sizes, reference = mine["class_sizes"].iloc[0], set(mine["reference_classes"].iloc[0])
        shown = [m for m in methods if m in set(mine["method"])]
        theirs = peers[peers["split"] == split] if len(peers) else peers
        peer_names = [p for p in PEER_COLUMNS if len(theirs) and p in set(theirs["peer"])]
        lines += ["", f"**{SPLITS[split].description}**", "",
                  "| type | n | " + " | ".join(shown + [PEER_COLUMNS[p] for p in peer_names]) + " |",
                  "|---" * (2 + len(shown) + len(peer_names)) + "|"]
        for name, n in sorted(sizes.items(), key=lambda item: -item[1]):
            if name not in reference:
                lines.append(f"| {name} (*novel*) | {n} |" + " |" * (len(shown) + len(peer_names)))
                continue
            cells = []
            for subset in [mine[mine["method"] == m] for m in shown] + [theirs[theirs["peer"] == p] for p in peer_names]:
                cells.append(f"{np.mean([r[name] for r in subset['per_class_recall']]):.2f}")
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return lines


def peer_cell(peers: pd.DataFrame, split: str, peer: str) -> str:
    if split in peers.index and peer in peers.columns and pd.notna(peers.loc[split, peer]):
        return f"{peers.loc[split, peer]:.3f}"
    quoted = PEER_TABLE.get(split, {}).get({"scnym": "scnym_0.3.2"}.get(peer, peer))
    return f"{quoted[0]:.3f} *q*" if quoted else "–"


def peer_mean(peers: pd.DataFrame, splits: list[str], peer: str) -> str:
    """A peer's mean over the splits it has a figure for (how many, when not all)."""
    values = [float(cell.split()[0]) for cell in (peer_cell(peers, s, peer) for s in splits) if cell != "–"]
    if not values:
        return ""
    return f"**{np.mean(values):.3f}**" + ("" if len(values) == len(splits) else f" ({len(values)} splits)")


def earlier_runs(path: Optional[Path]) -> pd.DataFrame:
    """Balanced accuracy per split x method (mean over seeds) of an earlier commit's runs (--before: a CSV
    with split, method, seed, balanced_accuracy and commit columns); empty without one."""
    if path is None or not path.exists():
        return pd.DataFrame(columns=["split", "method", "balanced_accuracy", "commit"])
    frame = pd.read_csv(path)
    return frame.groupby(["split", "method"], as_index=False).agg(
        balanced_accuracy=("balanced_accuracy", "mean"), n_seeds=("seed", "size"), commit=("commit", "first"))


def before_columns(before: pd.DataFrame, methods: list[str]) -> list[tuple[str, str]]:
    """(method, column title) of the earlier runs shown next to today's."""
    return [(m, f"{m} at {before[before['method'] == m]['commit'].iloc[0]}") for m in methods
            if m in set(before["method"])]


def markdown(summary: pd.DataFrame, info: dict, command: str, peers: pd.DataFrame,
             before: Optional[pd.DataFrame] = None, frame: Optional[pd.DataFrame] = None) -> str:
    methods = list(dict.fromkeys(summary["method"]))
    splits = list(dict.fromkeys(summary["split"]))
    table = summary.set_index(["split", "method"])
    before = before if before is not None else earlier_runs(None)
    earlier = before_columns(before, [m for m in methods if m not in ABLATIONS])
    previous = before.set_index(["split", "method"])["balanced_accuracy"]
    lines = ["# scnym accuracy on real label-transfer splits", "",
             *provenance(command, info, f"Python {info['python']}."), "",
             "Balanced accuracy on the query cells whose type the reference has (mean ± sd over seeds "
             f"{', '.join(map(str, sorted(set(summary['n_seeds']))))} per cell); peers measured side by side by "
             "`bench/peers.py` (bench/results/peers.csv; *q* = quoted from ../shared/data/README.md where not "
             "measured). Methods: " + "; ".join(f"`{m}` {' '.join(METHODS[m]) or '(defaults)'}"
                                              .replace(str(REPO) + "/", "") for m in methods) + ".", "",
             *([f"Columns *at <commit>*: the same methods with the code and defaults of that commit (`--before`; "
                "mean over its seeds)."] if earlier else []), "",
             "| split | shift | " + " | ".join(methods + [title for _, title in earlier]) + " | "
             + " | ".join(PEER_COLUMNS.values()) + " |",
             "|---" * (2 + len(methods) + len(earlier) + len(PEER_COLUMNS)) + "|"]
    for split in splits:
        cells = [f"{table.loc[(split, m), 'balanced_accuracy']:.3f} ± {table.loc[(split, m), 'balanced_accuracy_sd']:.3f}"
                 if (split, m) in table.index else "–" for m in methods]
        cells += [f"{previous[(split, m)]:.3f}" if (split, m) in previous.index else "–" for m, _ in earlier]
        lines.append(f"| {SPLITS[split].description} | {SPLITS[split].shift} | " + " | ".join(cells) + " | "
                     + " | ".join(peer_cell(peers, split, p) for p in PEER_COLUMNS) + " |")
    means = [summary[summary["method"] == m]["balanced_accuracy"].mean() for m in methods]
    means += [previous[[(s, m) for s in splits if (s, m) in previous.index]].mean() for m, _ in earlier]
    lines.append("| **mean over splits** | | " + " | ".join(f"**{v:.3f}**" for v in means) + " | "
                 + " | ".join(peer_mean(peers, splits, p) for p in PEER_COLUMNS) + " |")
    lines += ["", "Accuracy, macro-F1, ECE (calibration error over known types), novelty AUROC of (1 - confidence) for "
              "query cells of types the reference lacks, and train seconds (mean over seeds):", "",
              "| split | method | accuracy | macro-F1 | ECE | novelty AUROC | train s |", "|---|---|---|---|---|---|---|"]
    for (split, method), r in table.iterrows():
        lines.append(f"| {SPLITS[split].description} | {method} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['ece']:.3f} | {r['novel_auroc']:.3f} | {r['train_seconds']:.0f} |")
    if frame is not None and any(m not in ("supervised", "semi_supervised") for m in methods):
        lines += ablation_table(frame, methods)
    return "\n".join(lines) + "\n"


def variant_flags(method: str) -> str:
    """A --variant's flags as the table names it: what it sets beyond the target data."""
    flags = " ".join(METHODS[method]).replace("--unlabeled_counts QUERY", "").strip()
    return f"`{flags}`" if flags else ""


def ablation_table(frame: pd.DataFrame, methods: list[str]) -> list[str]:
    """One row per method: balanced accuracy per split (mean over its seeds), the mean, and the change from
    the defaults (semi_supervised) on the same seeds, on average and on the split where it loses most."""
    splits = [s for s in SPLITS if s in set(frame["split"])]
    base = frame[frame["method"] == "semi_supervised"].set_index(["split", "seed"])["balanced_accuracy"]
    lines = ["", "## Ablation: one change at a time to the semi-supervised defaults", "",
             "Balanced accuracy per split (mean over the method's seeds); Δ = the method minus the defaults "
             "(`semi_supervised`) on the same splits and seeds.", "",
             "| method | what it changes | seeds | " + " | ".join(SPLITS[s].description for s in splits)
             + " | mean | Δ mean | worst Δ |", "|---" * (6 + len(splits)) + "|"]
    for method in methods:
        mine = frame[frame["method"] == method]
        if not len(mine):
            continue
        values = mine.groupby("split")["balanced_accuracy"].mean().reindex(splits)
        paired = mine.set_index(["split", "seed"])["balanced_accuracy"]
        paired = paired[paired.index.isin(base.index)]
        delta = (paired - base[paired.index]).groupby(level="split").mean().reindex(splits)
        what = ABLATIONS[method][1] if method in ABLATIONS else {"semi_supervised": "**the defaults**",
                                                                  "supervised": "no target data"}.get(
            method, variant_flags(method))
        worst = "" if method == "semi_supervised" or delta.isna().all() else \
            f"{delta.min():+.3f} ({SPLITS[delta.idxmin()].description})"
        seeds = ", ".join(map(str, sorted(set(mine["seed"]))))
        lines.append(f"| {method} | {what} | {seeds} | " + " | ".join(
            "–" if pd.isna(v) else f"{v:.3f}" for v in values) + f" | {values.mean():.3f} | "
            + ("" if method == "semi_supervised" or delta.isna().all() else f"{delta.mean():+.3f}")
            + f" | {worst} |")
    return lines


def plot(summary: pd.DataFrame, path: Path, peers: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")  # this script's own process: a file, never a window
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(summary["split"]))
    methods = [m for m in dict.fromkeys(summary["method"]) if m not in ABLATIONS][:4]
    bars = methods + list(PEER_COLUMNS)
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(splits)), 4.5))
    for i, name in enumerate(bars):
        values, errors = [], []
        for split in splits:
            if name in methods:
                row = summary[(summary["split"] == split) & (summary["method"] == name)]
                values.append(float(row["balanced_accuracy"].iloc[0]) if len(row) else np.nan)
                errors.append(float(row["balanced_accuracy_sd"].iloc[0]) if len(row) else 0)
            else:
                cell = peer_cell(peers, split, name).split()[0]
                values.append(float(cell) if cell != "–" else np.nan)
                errors.append(0)
        ax.bar(np.arange(len(splits)) + i * width, values, width, yerr=errors,
               label=name if name in methods else PEER_COLUMNS[name],
               hatch="" if name in methods else "//", alpha=1.0 if name in methods else 0.6)
    ax.set_xticks(np.arange(len(splits)) + 0.4 - width / 2, [SPLITS[s].description for s in splits], fontsize=7,
                  rotation=25, ha="right")
    ax.set_ylabel("balanced accuracy on the query")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("scnym (solid) vs peers (hatched)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--methods", nargs="*", default=["supervised", "semi_supervised"], choices=list(METHODS))
    parser.add_argument("--ablation", action="store_true", help="add every method of ABLATIONS")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra method: a name and its training flags (QUERY = the query file), e.g. "
                             "'hvg=--n_top_genes 2000'; repeatable")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n_epochs", type=int, default=None, help="override the default")
    parser.add_argument("--num_threads", type=int, default=None, help="--num_threads of every run (e.g. 1 when "
                                                                       "two benchmarks share 2 cores)")
    parser.add_argument("--quick", action="store_true", help="tiny subsample and 2 epochs (for the test suite)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the CLI inside this interpreter (faster for ablations; no peak-memory figures)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs (same command) under --work")
    parser.add_argument("--peers", type=Path, default=RESULTS / "peers.csv", help="bench/peers.py's results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--tag", default="accuracy")
    parser.add_argument("--reuse_only", action="store_true",
                        help="with --resume: report the finished runs only, run nothing (e.g. some methods at more "
                             "seeds than others)")
    parser.add_argument("--before", type=Path, default=None,
                        help="an earlier commit's runs (CSV: split, method, seed, balanced_accuracy, commit), shown "
                             "next to today's")
    args = parser.parse_args(argv)
    command = "python bench/accuracy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    methods = list(args.methods)
    if args.ablation:
        methods += [m for m in ABLATIONS if m not in methods]
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        METHODS[name.strip()] = shlex.split(flags)
        methods.append(name.strip())

    info = machine()
    peers = measured_peers(args.peers)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for split in args.splits:
        for method in methods:
            for seed in args.seeds:
                row = run_one(split, method, seed, args)
                if row is None:  # --reuse_only and never run
                    continue
                rows.append(row)
                frame = pd.DataFrame(rows)
                frame.drop(columns=["class_sizes", "per_class_recall", "novel_called_as", "reference_classes"],
                           errors="ignore").to_csv(
                    args.out / f"{args.tag}.csv", index=False)   # after every run: partial results survive
    frame = pd.DataFrame(rows)
    summary = summarize(frame)
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": info,
                                               "rows": frame.to_dict(orient="records"),
                                               "summary": summary.to_dict(orient="records")})
    plot(summary, args.out / f"{args.tag}.png", peers)
    peer_json = args.peers.with_suffix(".json")
    peer_rows = json.loads(peer_json.read_text())["rows"] if peer_json.exists() else []
    report = markdown(summary, info, command, peers, earlier_runs(args.before), frame) + "\n".join(
        per_class_recall(frame, peer_rows, [m for m in methods if m not in ABLATIONS])) + "\n"
    write_markdown(args.out / f"{args.tag}.md", report.splitlines())
    return frame


if __name__ == "__main__":
    main()
