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
class Cells:
    """One side of a split: which cells of which file, and how their genes and labels are read."""

    file: str                               # in ../shared/data, or "scanpy:<file>" (a dataset in scanpy's wheel)
    label: str                              # label column of that file
    column: Optional[str] = None            # keep the cells whose `column` is one of `values`
    values: tuple[str, ...] = ()
    raw: bool = False                       # use .raw (its genes and values)
    rename: tuple[tuple[str, str], ...] = ()  # labels renamed to the reference's names
    species: Optional[str] = None           # "mouse:human": genes translated (scnym's --gene_species)


@dataclass(frozen=True)
class TransferSplit:
    """Train on ``reference``, predict ``query``; both written with their labels in column ``label``."""

    name: str
    reference: Cells
    query: Cells
    description: str
    shift: str = "mild"                     # mild (donors, chemistries, a stimulus) or strong (studies, species)
    label: str = "cell_type"


def _within(file: str, label: str, column: str, reference: tuple[str, ...], query: tuple[str, ...]):
    return Cells(file, label, column, reference), Cells(file, label, column, query)


def _leave_out(file: str, label: str, column: str, values: tuple[str, ...], held_out: str):
    return _within(file, label, column, tuple(v for v in values if v != held_out), (held_out,))


_CHEMISTRIES = ("3pv1", "3pv2", "5p")
_SAVERCAT = ("V2", "V3", "VDJ")
# scanpy's pbmc68k_reduced bulk labels, named after the sorted populations they were assigned from
_PBMC68K_NAMES = (("CD19+ B", "bcells"), ("CD56+ NK", "nk"), ("CD4+/CD25 T Reg", "regulatoryt"),
                  ("CD8+ Cytotoxic T", "cytotoxict"), ("CD8+/CD45RA+ Naive Cytotoxic", "naivecytotoxic"),
                  ("CD4+/CD45RA+/CD25- Naive T", "naivet"), ("CD4+/CD45RO+ Memory", "memoryt"),
                  ("CD14+ Monocyte", "monocytes"))

SPLITS = {s.name: s for s in [
    TransferSplit("kang_cross_donor", *_within("kang2018_ctrl_8donors.h5ad", "cluster_id", "sample_id",
                                               ("1015", "1256", "1488", "1244"), ("1016", "101", "107", "1039")),
                  "Kang cross-donor", label="cluster_id"),
    TransferSplit("kang_ctrl_to_stim", *_within("kang2018_ctrl_stim_small.h5ad", "cluster_id", "group_id",
                                                ("ctrl",), ("stim",)), "Kang ctrl -> stim", label="cluster_id"),
    *[TransferSplit(f"chemistry_{c}", *_leave_out("pbmc_3chemistries_small.h5ad", "cell_type", "donor", _CHEMISTRIES,
                                                  c), f"chemistry held out: {c}") for c in _CHEMISTRIES],
    TransferSplit("cellbench_celseq2_to_dropseq", *_within("cellbench_celseq2_dropseq.h5ad", "cell_line", "technology",
                                                           ("CEL-seq2",), ("Drop-seq",)),
                  "CellBench CEL-seq2 -> Drop-seq", label="cell_line"),
    *[TransferSplit(f"savercat_{c.lower()}", *_leave_out("pbmc_3chemistries_savercat.h5ad", "cell_type", "chemistry",
                                                         _SAVERCAT, c), f"10k genes, chemistry held out: {c}")
      for c in _SAVERCAT],
    TransferSplit("human_pbmc_to_mouse_lung", Cells("zheng2017_sorted_pbmc.h5ad", "cell_type_broad"),
                  Cells("zilionis2019_mouse_lung_immune.h5ad", "cell_type", species="mouse:human"),
                  "human PBMC (10x) -> mouse lung (inDrop)", shift="strong"),
    TransferSplit("sorted_pbmc_to_pbmc68k", Cells("zheng2017_sorted_pbmc.h5ad", "cell_type"),
                  Cells("scanpy:10x_pbmc68k_reduced.h5ad", "bulk_labels", raw=True, rename=_PBMC68K_NAMES),
                  "sorted PBMC -> pbmc68k (T subsets)", shift="strong"),
]}

# Balanced accuracy / accuracy the peers reach (../shared/data/README.md, one seed, CPU).
# Quoted for comparison; bench/peers.py measures them in the same run.
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


def scanpy_dataset(file: str, cache: Path) -> Path:
    """A dataset shipped inside scanpy's wheel, taken from the wheel (pip download; scanpy is not installed)."""
    import zipfile

    target = cache / file
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("scanpy-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", str(cache), "scanpy==1.11.5"], check=True)
        wheels = sorted(cache.glob("scanpy-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        target.write_bytes(wheel.read(f"scanpy/datasets/{file}"))
    return target


def _read_side(cells: Cells, label: str, work: Path, reference_genes=None):
    """The cells of one side as an AnnData with labels in ``label`` (genes translated where asked)."""
    import anndata as ad
    import pandas as pd

    if cells.file.startswith("scanpy:"):
        source = scanpy_dataset(cells.file.split(":", 1)[1], work / "scanpy")
    else:
        source = SHARED_DATA / cells.file
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing: the benchmarks need ../shared/data beside the checkout")
    adata = ad.read_h5ad(source)
    if cells.raw:
        adata = ad.AnnData(adata.raw.X, obs=adata.obs, var=pd.DataFrame(index=adata.raw.var_names))
    if cells.column is not None:
        adata = adata[adata.obs[cells.column].astype(str).isin(cells.values).to_numpy()].copy()
    labels = adata.obs[cells.label].astype(str).replace(dict(cells.rename))
    adata.obs = adata.obs.drop(columns=[cells.label]).assign(**{label: labels.to_numpy()})
    adata.obs[label] = adata.obs[label].astype("category")
    if cells.species is not None:
        from scnym_cli.data.orthologs import translate_species

        genes, _ = translate_species(adata.var_names, cells.species, reference_genes, str(source))
        adata.var_names = genes
        adata = adata[:, ~adata.var_names.duplicated()].copy()
    return adata


def materialize(split: TransferSplit, work: Path, max_cells: Optional[int] = None) -> tuple[Path, Path]:
    """Write the split's reference and query h5ad files (once); ``max_cells`` subsamples both (quick runs)."""
    import numpy as np

    tag = f"{split.name}" + (f"_max{max_cells}" if max_cells else "")
    reference_path, query_path = work / f"{tag}_reference.h5ad", work / f"{tag}_query.h5ad"
    if reference_path.exists() and query_path.exists():
        return reference_path, query_path
    work.mkdir(parents=True, exist_ok=True)
    reference = _read_side(split.reference, split.label, work)
    query = _read_side(split.query, split.label, work, reference.var_names)
    rng = np.random.default_rng(0)
    for adata, path in ((reference, reference_path), (query, query_path)):
        if max_cells and adata.n_obs > max_cells:
            adata = adata[np.sort(rng.choice(adata.n_obs, size=max_cells, replace=False))].copy()
        adata.write_h5ad(path)
    return reference_path, query_path


def shared_genes_file(reference: Path, query: Path) -> Optional[Path]:
    """Where the query holds under half of the reference's genes (scnym's minimum overlap), the genes the two
    share, for --genes_to_use (what every peer does by intersecting genes); else None."""
    import anndata as ad

    reference_genes = ad.read_h5ad(reference, backed="r").var_names
    query_genes = ad.read_h5ad(query, backed="r").var_names
    shared = reference_genes[reference_genes.isin(query_genes)]
    if len(shared) >= 0.5 * len(reference_genes):
        return None
    path = reference.with_name(reference.stem + ".shared_genes.txt")
    path.write_text("\n".join(shared) + "\n")
    return path


def query_scores(truth, predicted, confidence, reference_classes) -> dict:
    """Metrics of one run's query predictions, on the cells whose type the reference has (balanced accuracy
    over those types); cells of types the reference lacks are scored by how well (1 - confidence) ranks them
    as novel (AUROC against the known cells), with per-class recall and class sizes."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from scnym_cli.train.metrics import calibration_error, classification_metrics

    truth, predicted = np.asarray(truth, dtype=str), np.asarray(predicted, dtype=str)
    confidence = np.asarray(confidence, dtype=float)
    known = np.isin(truth, list(reference_classes))
    metrics = classification_metrics(truth[known], predicted[known])
    usable = np.isfinite(confidence).all() and len(confidence) and confidence.min() >= 0 and confidence.max() <= 1
    metrics["ece"] = (calibration_error(confidence[known], truth[known] == predicted[known]) if usable
                      else float("nan"))
    metrics["n_known"], metrics["n_novel"] = int(known.sum()), int((~known).sum())
    metrics["novel_auroc"] = (float(roc_auc_score(~known, -confidence)) if known.any() and (~known).any()
                              and np.isfinite(confidence).all() else float("nan"))
    sizes = pd.Series(truth).value_counts()
    metrics["class_sizes"] = {str(k): int(v) for k, v in sizes.items()}
    metrics["per_class_recall"] = {str(k): float(np.mean(predicted[truth == k] == k)) for k in sizes.index}
    novel = predicted[~known]
    metrics["novel_called_as"] = {str(k): int(v) for k, v in pd.Series(novel).value_counts().items()}
    metrics["reference_classes"] = sorted(map(str, reference_classes))
    return metrics


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
