"""The peers side by side on the real label-transfer splits, each run in its own virtualenv.

Peers: logistic regression (``../shared/peers/run_linear.py``), CellTypist 1.7.1, the original
scNym 0.3.2 (query given as unlabeled target data) and scANVI (scvi-tools 1.4.2). For every
split x peer x seed the peer's ``run_<peer>.py`` runs as a subprocess under ``nice -n 19`` and
``/usr/bin/time`` (wall seconds, peak resident memory); its predictions are scored against the
query's labels: accuracy, balanced accuracy, macro-F1 and ECE (expected calibration error of the
peer's ``confidence`` column, 15 equal-width bins). Writes ``<out>/<tag>.csv`` (one row per run,
failures included with their reason), ``<tag>.json`` (rows + machine + command) and ``<tag>.md``
(a table per split next to the figures quoted in ../shared/data/README.md).

The peers live OUTSIDE the repository, one virtualenv each under ``${PEERS_DIR:-$HOME/scnym-peers}``,
made by ../shared/peers/install_<peer>.sh; ``--install`` runs those installers for the missing
ones (never at import time). Logistic regression needs only anndata + scikit-learn and runs in the
interpreter that runs this script (the project venv).

    python bench/peers.py --install                        # all peers x splits, seed 0
    python bench/peers.py --install --threads 1            # same, one thread per peer (shared cores)
    python bench/peers.py --peers logreg celltypist --splits chemistry_5p --seeds 0 1 2
    python bench/peers.py --resume                         # reuse finished runs under --work
    python bench/peers.py --quick --out /tmp/x --work /tmp/w   # seconds: logreg on one subsample (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PEER_TABLE, REPO, RESULTS, SPLITS, WORK, machine, materialize, query_scores,  # noqa: E402
                    run_measured, shared_genes_file, write_json)

PEER_SCRIPTS = Path(os.environ.get("SCNYM_PEER_SCRIPTS", REPO.parent / "shared" / "peers"))
PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path.home() / "scnym-peers"))
QUICK_CELLS = 200


@dataclass(frozen=True)
class Peer:
    """How to run one peer: its runner in ../shared/peers and the virtualenv it runs in."""

    name: str
    title: str
    runner: str
    venv: Optional[str]              # under PEERS_DIR; None: this interpreter (the project venv)
    installer: Optional[str]
    module: Optional[str]            # imported to check that an existing venv works
    quoted: Optional[str]            # key in common.PEER_TABLE (the figures of ../shared/data/README.md)
    confidence: str                  # what the runner's confidence column is
    flags: tuple[str, ...] = ()
    tag_counts: bool = False         # give run_linear.py uns["x_kind"] = "counts" when X holds counts
    counts_splits_only: bool = False  # only meaningful where X holds counts
    ours: bool = False               # this repository's scnym: runner in bench/, given --genes-to-use where needed

    @property
    def runner_path(self) -> Path:
        return (REPO / "bench" if self.ours else PEER_SCRIPTS) / self.runner


PEERS = {p.name: p for p in [
    Peer("scnym_cli", "scnym (this repository)", "run_scnym_cli.py", None, None, None, None,
         "max calibrated class probability", ours=True),
    Peer("scnym_cli_supervised", "scnym supervised", "run_scnym_cli.py", None, None, None, None,
         "max calibrated class probability", flags=("--supervised",), ours=True),
    Peer("logreg", "logistic regression", "run_linear.py", None, None, None, "logreg",
         "max multinomial logistic-regression probability", tag_counts=True),
    Peer("celltypist", "CellTypist 1.7.1", "run_celltypist.py", "celltypist-venv", "install_celltypist.sh",
         "celltypist", "celltypist", "CellTypist conf_score: one-vs-rest (sigmoid) probability of the predicted type"),
    Peer("scnym", "scNym 0.3.2", "run_scnym.py", "scnym-venv", "install_scnym.sh", "scnym.api", "scnym_0.3.2",
         "max softmax probability"),
    # --pseudocounts only acts where no counts are found (the chemistry file: ln(CP10k+1) in X)
    Peer("scanvi", "scANVI (scvi-tools 1.4.2)", "run_scvi.py", "scvi-venv", "install_scvi.sh", "scvi", "scanvi",
         "max scANVI class posterior", flags=("--pseudocounts",)),
    # run_linear.py exactly as our files reach it: no uns["x_kind"], so raw counts are only scaled
    Peer("logreg_rawX", "logistic regression, X as given", "run_linear.py", None, None, None, None,
         "max multinomial logistic-regression probability", counts_splits_only=True),
]}
DEFAULT_PEERS = list(PEERS)

# Runner options that bound a run expected to exceed ~30 minutes on this shared 2-core machine:
# (peer, split) -> (extra flags, why); --unbounded drops them.
BOUNDS: dict[tuple[str, str], tuple[list[str], str]] = {
    ("scanvi", "kang_cross_donor"): (
        ["--scvi-epochs", "100"],
        "scvi-tools' epoch heuristic gives 400 scVI epochs for the 12,261 cells (~38k steps of 128 cells), "
        "which would take over an hour here; 100 epochs (~9.6k steps) keep the workflow otherwise unchanged "
        "(scANVI's own 20 epochs included)"),
}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # set by --threads


# ----------------------------------------------------------------- set-up
def peer_python(peer: Peer) -> Path:
    return Path(sys.executable) if peer.venv is None else PEERS_DIR / peer.venv / "bin" / "python"


def peer_environment() -> dict[str, str]:
    """The cache variables of ../shared/peers/env.sh (everything a peer writes stays under PEERS_DIR)."""
    script = f"source {shlex.quote(str(PEER_SCRIPTS / 'env.sh'))} && env -0"
    base = {**os.environ, "PEERS_DIR": str(PEERS_DIR)}
    done = subprocess.run(["bash", "-c", script], env=base, capture_output=True, check=True)
    after = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return {"PEERS_DIR": str(PEERS_DIR), **{k: v for k, v in after.items() if base.get(k) != v and k != "_"}}


def venv_works(peer: Peer) -> bool:
    python = peer_python(peer)
    if not python.exists():
        return False
    if peer.module is None:
        return True
    return subprocess.run([str(python), "-c", f"import {peer.module}"], capture_output=True).returncode == 0


def install(peers: list[Peer]) -> dict[str, str]:
    """Run ../shared/peers/install_<peer>.sh for every peer whose virtualenv is missing or broken."""
    outcome = {}
    for peer in peers:
        if peer.venv is None or venv_works(peer):
            continue
        PEERS_DIR.mkdir(parents=True, exist_ok=True)
        if not (PEERS_DIR / "env.sh").exists():  # the installers source $PEERS_DIR/env.sh
            shutil.copy(PEER_SCRIPTS / "env.sh", PEERS_DIR / "env.sh")
        log = PEERS_DIR / "logs" / f"install_{peer.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"installing {peer.title} into {PEERS_DIR / peer.venv} (log: {log})", flush=True)
        started = time.perf_counter()
        with open(log, "w") as handle:
            done = subprocess.run(["bash", str(PEER_SCRIPTS / peer.installer), str(PEERS_DIR / peer.venv)],
                                  env={**os.environ, "PEERS_DIR": str(PEERS_DIR)}, stdout=handle,
                                  stderr=subprocess.STDOUT)
        outcome[peer.name] = f"exit {done.returncode} after {time.perf_counter() - started:.0f} s"
        print(f"  {peer.name}: {outcome[peer.name]}", flush=True)
    return outcome


def holds_counts(path: Path) -> bool:
    """Whether X is integer-valued and non-negative (a sample of its stored values)."""
    import anndata as ad
    import scipy.sparse as sp

    X = ad.read_h5ad(path).X
    values = (X.data if sp.issparse(X) else np.asarray(X).ravel())[:200_000]
    return bool(values.size and values.min() >= 0 and np.allclose(values, np.round(values)))


def tagged_as_counts(path: Path) -> Path:
    """A copy of ``path`` with uns["x_kind"] = "counts", so run_linear.py log-normalizes it (once)."""
    import anndata as ad

    tagged = path.with_name(path.stem + ".x_kind_counts.h5ad")
    if not tagged.exists():
        adata = ad.read_h5ad(path)
        adata.uns["x_kind"] = "counts"
        adata.write_h5ad(tagged)
    return tagged


# ----------------------------------------------------------------- scoring
def evaluate(predictions: Path, query: Path, label: str, reference: Path) -> dict:
    """Scores on the query cells whose type the reference has (see common.query_scores)."""
    import anndata as ad

    table = pd.read_csv(predictions)
    obs = ad.read_h5ad(query, backed="r").obs
    truth = obs[label].astype(str).reindex(table["cell"].astype(str))
    scored = truth.notna().to_numpy()
    reference_classes = ad.read_h5ad(reference, backed="r").obs[label].astype(str).unique()
    metrics = query_scores(truth.to_numpy()[scored], table["prediction"].astype(str).to_numpy()[scored],
                           table["confidence"].to_numpy(dtype=float)[scored], reference_classes)
    confidence = table["confidence"].to_numpy(dtype=float)[scored]
    metrics["mean_confidence"] = float(confidence.mean()) if len(confidence) else float("nan")
    metrics["n_query"], metrics["n_scored"] = int(len(obs)), int(scored.sum())
    return metrics


def read_time_file(path: Path) -> tuple[Optional[float], Optional[float]]:
    """(seconds, peak MB) from /usr/bin/time -f "%e %M" output (also written when the command failed)."""
    if not path.exists():
        return None, None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    fields = lines[-1].split() if lines else []
    if len(fields) >= 2 and fields[-1].isdigit():
        return float(fields[0]), round(int(fields[-1]) / 1024, 1)
    return None, None


def read_meta(predictions: Path) -> dict:
    # run_linear.py writes preds.csv.meta.json, the others preds.meta.json
    for path in (Path(str(predictions) + ".meta.json"), predictions.with_suffix(".meta.json")):
        if path.exists():
            return json.loads(path.read_text())
    return {}


def input_line(log: Path) -> str:
    """The runner's own account of what it read (which matrix, counts or log data), where it prints one."""
    if not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    return " | ".join(line.removeprefix("[peer] ") for line in lines
                      if line.startswith("[peer] ") and ("from" in line or "->" in line))[:400]


# ----------------------------------------------------------------- one run
def finished_row(run_dir: Path, command: str) -> Optional[dict]:
    """The row of an earlier successful run of the same runner command (for --resume)."""
    if not (run_dir / "row.json").exists():
        return None
    previous = json.loads((run_dir / "row.json").read_text())
    if previous.get("command") == command and previous.get("status") == "ok":
        return {**previous, "reused": True}
    return None


def finished_launch(run_dir: Path, command: str) -> Optional[dict]:
    """How the same runner command was launched, where it ran to the end (predictions + /usr/bin/time line) but
    its driver stopped before writing the row; None otherwise."""
    launch = run_dir / "launch.json"
    if not launch.exists() or (run_dir / "row.json").exists() or not (run_dir / "predictions.csv").exists():
        return None
    launched = json.loads(launch.read_text())
    finished = read_time_file(run_dir / "run.time")[0] is not None
    return launched if finished and launched.get("command") == command else None


def run_one(split_name: str, peer: Peer, seed: int, args, environment: dict[str, str]) -> dict:
    split = SPLITS[split_name]
    reference, query = materialize(split, args.work / "data", max_cells=QUICK_CELLS if args.quick else None)
    counts = holds_counts(reference)
    if peer.tag_counts:  # each file on its own: a counts reference may meet a log-normalized query
        reference = tagged_as_counts(reference) if counts else reference
        query = tagged_as_counts(query) if holds_counts(query) else query
    run_dir = args.work / "peers" / split_name / peer.name / f"seed{seed}"
    predictions = run_dir / "predictions.csv"
    extra = [] if args.unbounded else BOUNDS.get((peer.name, split_name), ([], ""))[0]
    runner = [str(peer_python(peer)), str(peer.runner_path), "--ref", str(reference), "--query", str(query),
              "--label", split.label, "--out", str(predictions), "--seed", str(seed), *peer.flags, *extra]
    shared = shared_genes_file(reference, query) if peer.ours else None
    if shared is not None:
        runner += ["--genes-to-use", str(shared)]
    if peer.ours and args.quick:  # seconds, not a benchmark
        runner += ["--n_epochs", "2", "--min_steps_per_epoch", "2", "--n_hidden", "32", "--batch_size", "64"]
    command = ["env", *[f"{k}={v}" for k, v in environment.items()], "nice", "-n", "19", *runner]
    row = {"split": split_name, "peer": peer.name, "seed": seed, "status": "ok", "x_is_counts": counts,
           "runner_flags": " ".join([*peer.flags, *extra]), "threads": environment.get("OMP_NUM_THREADS"),
           "command": shlex.join(runner)}
    if args.resume:
        previous = finished_row(run_dir, row["command"])
        if previous is not None:
            previous.update(evaluate(predictions, query, split.label, reference))  # scored afresh from the runner's output
            print(f"{split_name:18s} {peer.name:12s} seed {seed}: reused {run_dir}", flush=True)
            return previous
    launched = finished_launch(run_dir, row["command"]) if args.resume else None
    if launched is not None:
        # the driver was interrupted after the runner finished: score what the runner left
        seconds, peak = read_time_file(run_dir / "run.time")
        row.update(launched, seconds=seconds, peak_mb=peak, recovered=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        row["load_1min_before"] = round(os.getloadavg()[0], 2)
        row["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(run_dir / "launch.json", {k: row[k] for k in ("command", "threads", "load_1min_before", "started")})
        if not peer_python(peer).exists():
            row.update(status="failed", error=f"virtualenv {PEERS_DIR / peer.venv} missing: run with --install")
        else:
            try:
                measured = run_measured(command, run_dir / "run.log")
                row.update(seconds=measured["seconds"], peak_mb=measured["peak_memory_mb"])
            except Exception as error:  # recorded, not hidden: the other runs go on
                seconds, peak = read_time_file(run_dir / "run.time")
                reason = [line for line in str(error).splitlines() if line.strip()]
                row.update(status="failed", seconds=seconds, peak_mb=peak,
                           error=reason[-1] if reason else repr(error), error_detail=str(error))
    if row["status"] == "ok":
        try:
            row.update(evaluate(predictions, query, split.label, reference))
        except Exception as error:
            row.update(status="failed", error=f"scoring the predictions failed: {error!r}")
    meta = read_meta(predictions)
    row.update({f"runner_{k}": meta.get(k) for k in ("load_prep_s", "train_s", "predict_s", "total_s")})
    row.update(peer_version=meta.get("version"), runner_meta=meta, runner_input=input_line(run_dir / "run.log"))
    # the quoted figures are for the whole split, not for the --quick subsample
    quoted = PEER_TABLE.get(split_name, {}).get(peer.quoted) if peer.quoted and not args.quick else None
    row["quoted_balanced_accuracy"], row["quoted_accuracy"] = quoted if quoted else (None, None)
    write_json(run_dir / "row.json", row)
    if row["status"] == "ok":
        print(f"{split_name:18s} {peer.name:12s} seed {seed}: balanced accuracy {row['balanced_accuracy']:.4f} "
              f"accuracy {row['accuracy']:.4f} ECE {row['ece']:.4f} ({row['seconds']:.0f} s, "
              f"{row['peak_mb']} MB)", flush=True)
    else:
        print(f"{split_name:18s} {peer.name:12s} seed {seed}: FAILED: {row['error']}", flush=True)
    return row


# ----------------------------------------------------------------- reports
CSV_COLUMNS = ["split", "peer", "seed", "status", "balanced_accuracy", "accuracy", "macro_f1", "ece",
               "mean_confidence", "n_query", "n_scored", "seconds", "peak_mb", "runner_load_prep_s", "runner_train_s",
               "runner_predict_s", "runner_total_s", "quoted_balanced_accuracy", "quoted_accuracy", "peer_version",
               "x_is_counts", "runner_flags", "threads", "load_1min_before", "started", "reused", "recovered",
               "runner_input", "error", "command"]


def number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown(rows: pd.DataFrame, info: dict, command: str) -> str:
    lines = ["# Peers on the real label-transfer splits", "",
             f"Command: `{command}`  ",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; {info['date']}; peers in "
             f"virtualenvs under `{info['peers_dir']}` (Python {info['python']}).", "",
             "**Timings were taken on a shared machine**: every peer ran under `nice -n 19` while another benchmark "
             "(and other work) used the same 2 cores, with a load average of "
             f"{number(rows['load_1min_before'].min(), 1)}–{number(rows['load_1min_before'].max(), 1)} when runs "
             "started (`load_1min_before` in the CSV); some peers also ran at once. Seconds are therefore upper "
             "bounds, only roughly comparable between peers and not comparable with timings from an idle machine; "
             "accuracy is what these runs are for. " + threads_sentence(rows), "",
             "Balanced accuracy (mean per-class recall, the metric that counts), accuracy and macro-F1 on the query; "
             "ECE = expected calibration error of the peer's confidence column (15 bins). *Quoted* = balanced "
             "accuracy / accuracy in ../shared/data/README.md; Δ = measured − quoted balanced accuracy. Seconds and "
             "peak MB: the whole runner process (load, train, predict) under /usr/bin/time; the runner's own "
             "train seconds are in the CSV (`runner_train_s`)."]
    lines += summary_table(rows)
    for split_name in dict.fromkeys(rows["split"]):
        lines += ["", f"## {SPLITS[split_name].description}", "", query_sentence(rows[rows["split"] == split_name]),
                  "",
                  "| peer | seed | balanced acc. | accuracy | macro-F1 | ECE | seconds | peak MB | quoted | "
                  "Δ bal. acc. | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        mine = rows[rows["split"] == split_name]
        peer_order = {name: i for i, name in enumerate(dict.fromkeys(rows["peer"]))}
        for _, r in mine.sort_values(["peer", "seed"], key=lambda c: c.map(peer_order) if c.name == "peer" else c,
                                     kind="stable").iterrows():
            peer = PEERS[r["peer"]]
            quoted = (f"{r['quoted_balanced_accuracy']:.3f} / {r['quoted_accuracy']:.3f}"
                      if pd.notna(r.get("quoted_balanced_accuracy")) else "–")
            delta = (round(r["balanced_accuracy"] - r["quoted_balanced_accuracy"], 3) + 0.0  # + 0.0: no "-0.000"
                     if r["status"] == "ok" and pd.notna(r.get("quoted_balanced_accuracy")) else None)
            notes = []
            if r["status"] != "ok":
                notes.append(f"**failed**: {r['error']}")
            if r.get("runner_flags"):
                notes.append(f"flags `{r['runner_flags']}`")
            if peer.tag_counts and r["x_is_counts"]:
                notes.append('copies with uns["x_kind"]="counts"')
            if delta is not None and abs(delta) > 0.02:
                notes.append("deviates > 0.02 from quoted")
            lines.append(f"| {peer.title} | {r['seed']} | {number(r.get('balanced_accuracy'))} | "
                         f"{number(r.get('accuracy'))} | "
                         f"{number(r.get('macro_f1'))} | {number(r.get('ece'))} | {number(r.get('seconds'), 0)} | "
                         f"{number(r.get('peak_mb'), 0)} | {quoted} | "
                         f"{'–' if delta is None else f'{delta:+.3f}'} | {'; '.join(notes)} |")
    ok = rows[rows["status"] == "ok"]
    lines += ["", "## Time per peer", "", "| peer | runs | failed | total seconds | slowest run (s) | max peak MB |",
              "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(rows["peer"]):
        mine, done = rows[rows["peer"] == name], ok[ok["peer"] == name]
        lines.append(f"| {PEERS[name].title} | {len(mine)} | {int((mine['status'] != 'ok').sum())} | "
                     f"{number(mine['seconds'].sum(), 0)} | {number(mine['seconds'].max(), 0)} | "
                     f"{number(done['peak_mb'].max() if len(done) else None, 0)} |")
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes_for(rows)]
    return "\n".join(lines) + "\n"


def query_sentence(rows: pd.DataFrame) -> str:
    """The query's class sizes: how much one cell of the rarest type moves balanced accuracy."""
    sizes = next((r for r in rows.get("class_sizes", pd.Series(dtype=object)) if isinstance(r, dict)), None)
    if not sizes:
        return ""
    smallest = sorted(sizes.items(), key=lambda item: item[1])[:3]
    return (f"Query: {sum(sizes.values())} cells in {len(sizes)} types; smallest: "
            + ", ".join(f"{name} ({n})" for name, n in smallest)
            + f". One cell of {smallest[0][0]} moves balanced accuracy by {1 / (len(sizes) * smallest[0][1]):.3f}.")


def threads_sentence(rows: pd.DataFrame) -> str:
    threads = rows["threads"].fillna("default").astype(str)
    if (threads == "default").all():
        return "Peers used their libraries' default thread counts."
    counts = ", ".join(f"{n} with {'the default threads (2 cores)' if t == 'default' else f'{t} thread(s)'}"
                       for t, n in threads.value_counts().items())
    return (f"Thread settings (OMP/MKL/OpenBLAS, column `threads`): {counts}; one thread per peer avoids "
            "oversubscribing the shared cores, which slowed the torch peers several-fold.")


def summary_table(rows: pd.DataFrame) -> list[str]:
    """Balanced accuracy / accuracy per split and peer (seed mean), laid out like ../shared/data/README.md;
    where a peer ran at several seeds, the balanced accuracy's standard deviation and the seed count follow."""
    names = list(dict.fromkeys(rows["peer"]))
    lines = ["", "## Summary: balanced accuracy / accuracy (quoted figure in brackets)", "",
             "Means over the seeds that ran; where there are several, the balanced accuracy's sample standard "
             "deviation follows it (`± sd`) and the seed count ends the cell.", "",
             "| split | " + " | ".join(PEERS[n].title for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for split_name in dict.fromkeys(rows["split"]):
        cells = []
        for name in names:
            mine = rows[(rows["split"] == split_name) & (rows["peer"] == name)]
            done = mine[mine["status"] == "ok"]
            if not len(mine):
                cells.append("")
                continue
            spread = f" ± {done['balanced_accuracy'].std():.3f}" if len(done) > 1 else ""
            text = (f"{done['balanced_accuracy'].mean():.3f}{spread} / {done['accuracy'].mean():.3f}" if len(done)
                    else "failed") + (f" ({len(done)} seeds)" if len(done) > 1 else "")
            quoted = PEER_TABLE.get(split_name, {}).get(PEERS[name].quoted) if pd.notna(
                mine["quoted_balanced_accuracy"].iloc[0]) else None
            cells.append(text + (f" ({quoted[0]:.3f} / {quoted[1]:.3f})" if quoted else ""))
        lines.append(f"| {SPLITS[split_name].description} | " + " | ".join(cells) + " |")
    return lines


def notes_for(rows: pd.DataFrame) -> list[str]:
    names = set(rows["peer"])
    notes = []
    if names & {"logreg", "logreg_rawX"}:
        notes.append(
            '`run_linear.py` log-normalizes (log1p CP10k) only when `uns["x_kind"] == "counts"`; our h5ad files '
            "do not set it, and the two Kang files hold raw counts in X. Fed as they are, logistic regression is fit "
            "on raw counts scaled per gene, without library-size normalization or log. That matters: the `logreg` "
            'rows therefore use copies of the split files with `uns["x_kind"] = "counts"` where X holds counts '
            "(the runner's documented log1p(CP10k) baseline, which is what the quoted figures match); the "
            "`logreg_rawX` rows show the runner on the files as given (Kang splits only: the chemistry file "
            "already holds ln(CP10k+1), where both are the same run).")
    if "celltypist" in names:
        notes.append("CellTypist's confidence is its conf_score, a one-vs-rest (sigmoid) probability of the predicted "
                     "type, not a softmax over types; its ECE is that of this one-vs-rest probability.")
    if "scanvi" in names:
        notes.append("scANVI needs counts: the Kang files hold raw counts; the chemistry file holds ln(CP10k+1) only, "
                     "so `run_scvi.py --pseudocounts` rebuilds counts as round(expm1(x)/min nonzero per cell) there "
                     "(a compromise the runner documents); see `runner_input` in the CSV for what each run used.")
    if "scnym" in names:
        notes.append("scNym 0.3.2 gets the query as unlabeled target data with the runner's default "
                     "`no_new_identity` config (100 epochs); inputs re-normalized to log1p(CPM) by the runner.")
    notes.append("Confidence column (what ECE is computed on): " + "; ".join(
        f"{PEERS[n].title}: {PEERS[n].confidence}" for n in dict.fromkeys(rows["peer"])) + ".")
    for _, r in rows.iterrows():
        flags, why = BOUNDS.get((r["peer"], r["split"]), ([], ""))
        if flags and " ".join(flags) in str(r["runner_flags"]):
            notes.append(f"Bounded: {PEERS[r['peer']].title} on {SPLITS[r['split']].description} ran with "
                         f"`{' '.join(flags)}`: {why}.")
    reused = rows[rows["reused"].eq(True)] if "reused" in rows.columns else rows.iloc[:0]
    if len(reused):
        notes.append(f"{len(reused)} of {len(rows)} rows were measured by an earlier invocation with the same runner "
                     "command and reused here (`--resume`); `started` in the CSV says when each run was measured.")
    if "merged_from" in rows.columns:
        for earlier, count in rows["merged_from"].dropna().value_counts(sort=False).items():
            notes.append(f"{count} rows come from an earlier report (`--merge`), measured by `{earlier}`.")
    recovered = rows[rows["recovered"].eq(True)] if "recovered" in rows.columns else rows.iloc[:0]
    for _, r in recovered.iterrows():
        notes.append(f"{PEERS[r['peer']].title} on {SPLITS[r['split']].description}: the benchmark driver was stopped "
                     "while this runner kept going; its finished outputs (predictions, meta.json, /usr/bin/time line) "
                     "were scored by `--resume` (seconds = /usr/bin/time's elapsed).")
    for _, r in rows[rows["status"] == "ok"].iterrows():
        quoted = r.get("quoted_balanced_accuracy")
        if pd.isna(quoted) or abs(r["balanced_accuracy"] - quoted) <= 0.02:
            continue
        sizes, recall = r.get("class_sizes"), r.get("per_class_recall")
        detail = ""
        if isinstance(sizes, dict) and isinstance(recall, dict):
            smallest = sorted(sizes, key=sizes.get)[:3]
            detail = "; recall on the smallest query types: " + ", ".join(
                f"{name} {round(recall[name] * sizes[name])}/{sizes[name]}" for name in smallest)
        notes.append(f"Deviation: {PEERS[r['peer']].title} on {SPLITS[r['split']].description} reaches "
                     f"{r['balanced_accuracy']:.3f} balanced accuracy vs {r['quoted_balanced_accuracy']:.3f} quoted "
                     f"(accuracy {r['accuracy']:.3f} vs {r['quoted_accuracy']:.3f}){detail}.")
    for _, r in rows[rows["status"] != "ok"].iterrows():
        notes.append(f"FAILED: {PEERS[r['peer']].title} on {SPLITS[r['split']].description} (seed {r['seed']}): "
                     f"{r['error']}")
    return notes


def merged_rows(paths: list[Path], running: list[tuple[str, str, int]]) -> list[dict]:
    """The rows of earlier result files (--merge) that this invocation does not run again, each marked
    with the command that measured it."""
    rows = []
    for path in paths:
        payload = json.loads(path.read_text())
        for row in payload["rows"]:
            if (row["split"], row["peer"], row["seed"]) not in running and row["peer"] in PEERS:
                rows.append({**row, "merged_from": payload["command"]})
    return rows


def write_outputs(rows: list[dict], args, info: dict, command: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in CSV_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    args.out.mkdir(parents=True, exist_ok=True)
    frame[CSV_COLUMNS].to_csv(args.out / f"{args.tag}.csv", index=False)
    write_json(args.out / f"{args.tag}.json", {"command": command, "machine": info, "rows": rows})
    (args.out / f"{args.tag}.md").write_text(markdown(frame, info, command))
    return frame


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--peers", nargs="+", default=DEFAULT_PEERS, choices=list(PEERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--install", action="store_true", help="run ../shared/peers/install_*.sh for missing venvs")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL/OpenBLAS threads per peer process (default: the libraries' own choice); 1 "
                             "avoids thread oversubscription when the cores are shared")
    parser.add_argument("--unbounded", action="store_true", help="drop the epoch bounds of BOUNDS")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs (same command) under --work")
    parser.add_argument("--quick", action="store_true",
                        help=f"logistic regression and a 2-epoch scnym only, on {QUICK_CELLS} cells of Kang ctrl -> stim "
                             "(test suite)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--tag", default="peers")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], metavar="JSON",
                        help="earlier results (<tag>.json) whose runs join this report, unless this invocation runs "
                             "the same split x peer x seed; their commands are listed in the notes")
    args = parser.parse_args(argv)
    command = "python bench/peers.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.peers, args.splits = ["logreg", "scnym_cli"], ["kang_ctrl_to_stim"]
    peers = [PEERS[name] for name in args.peers]

    installed = install(peers) if args.install else {}
    info = {**machine(), "peers_dir": str(PEERS_DIR), "peer_scripts": str(PEER_SCRIPTS), "installed": installed,
            "scikit_learn_for_logreg": __import__("sklearn").__version__, "nice": 19, "quick": args.quick,
            "wrapper": "/usr/bin/time -f '%e %M' env <env.sh cache variables> nice -n 19 <runner command>"}
    environment = peer_environment()
    if args.threads:
        environment.update({name: str(args.threads) for name in THREAD_VARIABLES})
    rows: list[dict] = []
    frame = pd.DataFrame()
    merged = merged_rows(args.merge, [(s, p.name, seed) for s in args.splits for p in peers for seed in args.seeds])
    for split_name in args.splits:
        for peer in peers:
            if peer.counts_splits_only and not holds_counts(materialize(SPLITS[split_name], args.work / "data",
                                                                        QUICK_CELLS if args.quick else None)[0]):
                continue
            for seed in args.seeds:
                rows.append(run_one(split_name, peer, seed, args, environment))
                frame = write_outputs(merged + rows, args, info, command)  # after every run: partial results survive
    print((args.out / f"{args.tag}.md").read_text())
    return frame


if __name__ == "__main__":
    main()
