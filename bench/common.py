"""Shared pieces of the benchmarks: the real label-transfer splits, machine facts, timing."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCNYM_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / "work"


@dataclass(frozen=True)
class TransferSplit:
    """Train on the cells whose ``column`` is in ``reference``, predict those in ``query``."""

    name: str
    file: str
    label: str
    column: str
    reference: tuple[str, ...]
    query: tuple[str, ...]
    description: str


SPLITS = {s.name: s for s in [
    TransferSplit("kang_cross_donor", "kang2018_ctrl_8donors.h5ad", "cluster_id", "sample_id",
                  ("1015", "1256", "1488", "1244"), ("1016", "101", "107", "1039"), "Kang cross-donor"),
    TransferSplit("kang_ctrl_to_stim", "kang2018_ctrl_stim_small.h5ad", "cluster_id", "group_id",
                  ("ctrl",), ("stim",), "Kang ctrl -> stim"),
    TransferSplit("chemistry_3pv1", "pbmc_3chemistries_small.h5ad", "cell_type", "donor",
                  ("3pv2", "5p"), ("3pv1",), "chemistry held out: 3pv1"),
    TransferSplit("chemistry_3pv2", "pbmc_3chemistries_small.h5ad", "cell_type", "donor",
                  ("3pv1", "5p"), ("3pv2",), "chemistry held out: 3pv2"),
    TransferSplit("chemistry_5p", "pbmc_3chemistries_small.h5ad", "cell_type", "donor",
                  ("3pv1", "3pv2"), ("5p",), "chemistry held out: 5p"),
]}

# Balanced accuracy / accuracy the peers reach (../shared/data/README.md, one seed, CPU).
# Quoted for comparison; bench/peers.py (benchmarks issue) measures them in the same run.
PEER_TABLE = {
    "kang_cross_donor": {"logreg": (0.818, 0.914), "celltypist": (0.811, 0.899), "scnym_0.3.2": (0.828, 0.927),
                         "scanvi": (0.839, 0.896)},
    "kang_ctrl_to_stim": {"logreg": (0.907, 0.912), "celltypist": (0.907, 0.914), "scnym_0.3.2": (0.888, 0.904),
                          "scanvi": (0.895, 0.901)},
    "chemistry_3pv1": {"logreg": (0.758, 0.917), "celltypist": (0.747, 0.907), "scnym_0.3.2": (0.729, 0.914),
                       "scanvi": (0.760, 0.924)},
    "chemistry_3pv2": {"logreg": (0.750, 0.892), "celltypist": (0.793, 0.925), "scnym_0.3.2": (0.842, 0.923),
                       "scanvi": (0.910, 0.938)},
    "chemistry_5p": {"logreg": (0.802, 0.958), "celltypist": (0.813, 0.963), "scnym_0.3.2": (0.759, 0.967),
                     "scanvi": (0.815, 0.970)},
}


def materialize(split: TransferSplit, work: Path, max_cells: Optional[int] = None) -> tuple[Path, Path]:
    """Write the split's reference and query h5ad files (once); ``max_cells`` subsamples both (quick runs)."""
    import anndata as ad
    import numpy as np

    source = SHARED_DATA / split.file
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: the benchmarks need ../shared/data beside the checkout")
    tag = f"{split.name}" + (f"_max{max_cells}" if max_cells else "")
    reference, query = work / f"{tag}_reference.h5ad", work / f"{tag}_query.h5ad"
    if reference.exists() and query.exists():
        return reference, query
    work.mkdir(parents=True, exist_ok=True)
    full = ad.read_h5ad(source)
    groups = full.obs[split.column].astype(str)
    rng = np.random.default_rng(0)
    for path, wanted in ((reference, split.reference), (query, split.query)):
        rows = np.flatnonzero(groups.isin(wanted).to_numpy())
        if max_cells and len(rows) > max_cells:
            rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
        full[rows].copy().write_h5ad(path)
    return reference, query


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    import scnym_cli

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        memory_gb = float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1),
            "python": platform.python_version(), "torch": torch.__version__, "scnym": scnym_cli.__version__,
            "git_commit": commit, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def run_measured(command: Sequence[str], log_path: Path) -> dict:
    """Run a command; wall time and peak resident memory (of the child, via /usr/bin/time if present)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timing = log_path.with_suffix(".time")
    wrapped = list(command)
    if Path("/usr/bin/time").exists():
        wrapped = ["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *wrapped]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.run(wrapped, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                       "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    peak_mb = None
    if timing.exists():
        fields = timing.read_text().split()
        if len(fields) >= 2 and fields[-1].isdigit():
            peak_mb = int(fields[-1]) / 1024
    if process.returncode != 0:
        tail = log_path.read_text().splitlines()[-5:]
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n" + "\n".join(tail))
    return {"seconds": round(seconds, 2), "peak_memory_mb": None if peak_mb is None else round(peak_mb, 1)}


def scnym_command() -> list[str]:
    return [sys.executable, "-m", "scnym_cli"]


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))


def provenance(command: str, info: dict, extra: str = "") -> list[str]:
    """The first lines of every results file: the command and what it ran on."""
    return [f"Command: `{command}`  ",
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; torch {info['torch']}, "
            f"scnym {info['scnym']} (commit {info['git_commit']}), {info['date']}." + (f" {extra}" if extra else "")]


def write_markdown(path: Path, lines: Sequence[str]) -> None:
    """Write a results summary and echo it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
