"""A model directory: weights without pickle (safetensors) plus a JSON manifest.

The manifest is the single source of truth at prediction time: the architecture, the gene
order, the class names, the normalization and the calibration temperature come from it,
never from the caller's config. Loading checks the format version, the weights' checksum
and that weights and manifest agree.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .data.labels import Labels, one_hot, read_groups
from .errors import ScnymError
from .nn import CellTypeClassifier
from .train.conformal import ConformalCalibration
from .train.novelty import NoveltyReference

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "00_best_model_weights.safetensors"
MANIFEST_FILE = "model.json"
ALL_DATA_DIR = "all_data"
MODEL_CLASSES = {"CellTypeClassifier": CellTypeClassifier}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


NAMES_PER_UPDATE = 100_000


def data_fingerprint(X: sp.csr_matrix, genes: Sequence[str], cell_ids: Sequence[str],
                     labels: Labels) -> dict[str, Any]:
    """A checksum of exactly what the model was trained on (normalized matrix, genes, cells, labels)."""
    from .data.matrix import digest_and_nnz

    content, nnz = digest_and_nnz(X)
    digest = hashlib.sha256(content.encode())  # the same in memory, stacked or read from disk
    for names in (genes, cell_ids, labels):
        # the names joined by newlines, hashed a slice at a time (one string of 5 million cell ids took 170 MB)
        for start in range(0, len(names), NAMES_PER_UPDATE):
            joined = "\n".join(map(str, names[start:start + NAMES_PER_UPDATE]))
            digest.update((("\n" if start else "") + joined).encode())
    return {"sha256": digest.hexdigest(), "n_cells": int(X.shape[0]), "n_genes": int(X.shape[1]),
            "nnz": nnz}


@dataclass
class LoadedModel:
    model: CellTypeClassifier
    manifest: dict[str, Any]
    directory: Path
    novelty: Optional[NoveltyReference] = None   # None for models saved without one (older scnym)
    calibration: Optional[ConformalCalibration] = None  # held-out (or model-selection) cells; None: older scnym

    @property
    def genes(self) -> list[str]:
        return self.manifest["genes"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def temperature(self) -> float:
        return float(self.manifest.get("temperature", 1.0))


def save_model(directory: Path, model: CellTypeClassifier, *, genes: Sequence[str], classes: Sequence[str],
               config: dict, extra: Optional[dict] = None) -> Path:
    """Write the weights and a manifest describing them into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights_path = directory / WEIGHTS_FILE
    # one metadata key: safetensors writes its metadata map in no fixed order, and identical weights
    # must give identical files (their checksum goes into the manifest)
    save_file(state, str(weights_path), metadata={"format": "pt"})
    manifest = {
        "format_version": FORMAT_VERSION,
        "package": "scnym_cli",
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"class": type(model).__name__, "kwargs": model.hyperparameters},
        "genes": [str(g) for g in genes],
        "classes": [str(c) for c in classes],
        "normalization": "log1p_cpm",
        "temperature": 1.0,
        "seed": config.get("seed"),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": file_sha256(weights_path),
        **(extra or {}),
        "config": config,
    }
    manifest["meaning_sha256"] = meaning_sha256(manifest)
    manifest_path = directory / MANIFEST_FILE
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str))
    return manifest_path


# the manifest fields that give the weights their meaning: edit one and the same weights predict something else
MEANING_FIELDS = ("model", "genes", "classes", "normalization", "temperature", "covariates", "weights_sha256",
                  "novelty", "conformal")


def meaning_sha256(manifest: dict) -> str:
    """A checksum over a canonical form of the fields that give the weights meaning (MEANING_FIELDS)."""
    meaning = {key: manifest.get(key) for key in MEANING_FIELDS}
    return hashlib.sha256(json.dumps(meaning, sort_keys=True, default=str).encode()).hexdigest()


def _read_manifest(manifest_path: Path) -> dict:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScnymError(f"{manifest_path} is not valid JSON ({str(e).splitlines()[0]}); the model directory is "
                         "damaged") from None
    if not isinstance(manifest, dict):
        raise ScnymError(f"{manifest_path} does not hold a model manifest; the model directory is damaged")
    return manifest


def _check_manifest(manifest: dict, manifest_path: Path) -> None:
    """Types and ranges of what the manifest says, and the checksum of its meaning: a clear error, never a
    model that loads and predicts something else."""
    expected = manifest.get("meaning_sha256")
    if expected is not None and meaning_sha256(manifest) != expected:
        raise ScnymError(f"{manifest_path} was edited after training: its genes, classes, temperature or architecture "
                         "no longer match the checksum written with the weights; restore the file or retrain")
    for key in ("genes", "classes"):
        values = manifest[key]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ScnymError(f"{manifest_path}: {key!r} must be a non-empty list of names; the file is damaged")
        if len(set(values)) != len(values):
            raise ScnymError(f"{manifest_path}: {key!r} lists a name twice; the file is damaged")
    temperature = manifest.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ScnymError(f"{manifest_path}: 'temperature' must be a positive number, not {temperature!r}; the file "
                         "is damaged")
    kwargs = manifest["model"].get("kwargs") if isinstance(manifest["model"], dict) else None
    if not isinstance(kwargs, dict):
        raise ScnymError(f"{manifest_path}: 'model' has no 'kwargs' (the architecture); the file is damaged")
    for key in ("n_genes", "n_classes", "n_hidden", "n_layers"):
        if key in kwargs and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], int) or kwargs[key] < 1):
            raise ScnymError(f"{manifest_path}: model {key!r} must be a positive whole number, not {kwargs[key]!r}; "
                             "the file is damaged")


def resolve_model_path(path: Path) -> tuple[Path, Path]:
    """(weights, manifest) of a run directory (-> all_data/), a fold directory, a weights file or a manifest."""
    path = Path(path)
    if not path.exists():
        raise ScnymError(f"--model_path {path} does not exist")
    if path.is_dir():
        for directory in (path, path / ALL_DATA_DIR):
            if (directory / MANIFEST_FILE).is_file():
                manifest = directory / MANIFEST_FILE
                break
        else:
            raise ScnymError(f"--model_path {path} holds no {MANIFEST_FILE} (nor {ALL_DATA_DIR}/{MANIFEST_FILE}); "
                             "give a training run directory, a fold directory or a weights file")
    elif path.name == MANIFEST_FILE:
        manifest = path
    else:
        manifest = path.parent / MANIFEST_FILE
        if not manifest.is_file():
            raise ScnymError(f"no {MANIFEST_FILE} beside the weights file {path}; the manifest is needed to "
                             "rebuild the model")
    try:
        weights_name = json.loads(manifest.read_text()).get("weights_file", WEIGHTS_FILE)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScnymError(f"{manifest} is not valid JSON ({e}); the model directory is damaged") from None
    weights = path if path.is_file() and path.name != MANIFEST_FILE else manifest.parent / weights_name
    return weights, manifest


def load_model(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild a model from its manifest and load its weights (no pickle)."""
    weights_path, manifest_path = resolve_model_path(path)
    manifest = _read_manifest(manifest_path)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ScnymError(f"{manifest_path} has model format version {version!r}; this scnym reads up to "
                         f"{FORMAT_VERSION}: upgrade scnym")
    for key in ("model", "genes", "classes"):
        if key not in manifest:
            raise ScnymError(f"{manifest_path} lacks {key!r}; the model directory is damaged")
    _check_manifest(manifest, manifest_path)
    if not weights_path.is_file():
        raise ScnymError(f"weights file {weights_path} is missing; the model directory is incomplete")
    expected = manifest.get("weights_sha256")
    if expected and file_sha256(weights_path) != expected:
        raise ScnymError(f"weights file {weights_path} does not match the checksum in {manifest_path}; "
                         "the file is damaged or from another model")
    model_class = MODEL_CLASSES.get(manifest["model"].get("class"))
    if model_class is None:
        raise ScnymError(f"{manifest_path} names an unknown model class {manifest['model'].get('class')!r}")
    kwargs = manifest["model"]["kwargs"]
    if kwargs.get("n_genes") != len(manifest["genes"]) or kwargs.get("n_classes") != len(manifest["classes"]):
        raise ScnymError(f"{manifest_path}: the model's sizes do not match its gene and class lists")
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
            model = model_class(**kwargs)
    except (TypeError, ValueError) as e:
        raise ScnymError(f"{manifest_path}: the model's architecture cannot be built ({e}); the file is damaged") \
            from None
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).splitlines()[0]
        raise ScnymError(f"could not load weights {weights_path} ({first}); the file is damaged or does not "
                         "match its manifest") from None
    model.to(device).eval()
    novelty_file = _checked_file(manifest, "novelty", manifest_path)
    calibration_file = _checked_file(manifest, "conformal", manifest_path)
    return LoadedModel(model, manifest, manifest_path.parent,
                       NoveltyReference.load(novelty_file.parent) if novelty_file else None,
                       ConformalCalibration.load(calibration_file) if calibration_file else None)


def load_calibration(directory: Path) -> Optional[ConformalCalibration]:
    """A model directory's conformal calibration set alone (checked against its manifest), without loading the
    model: what a run's folds contribute when they calibrate prediction sets but do not predict."""
    manifest_path = Path(directory) / MANIFEST_FILE
    manifest = _read_manifest(manifest_path)
    _check_manifest(manifest, manifest_path)
    path = _checked_file(manifest, "conformal", manifest_path)
    return ConformalCalibration.load(path) if path else None


def _checked_file(manifest: dict, key: str, manifest_path: Path) -> Optional[Path]:
    """The file the manifest names under ``key`` (None: none), checked against its checksum."""
    entry = manifest.get(key)
    if not entry:
        return None
    path = manifest_path.parent / entry["file"]
    if not path.is_file():
        raise ScnymError(f"{path} is missing; the model directory is incomplete")
    if file_sha256(path) != entry.get("sha256"):
        raise ScnymError(f"{path} does not match the checksum in {manifest_path}; the file is damaged or from "
                         "another model")
    return path


# ---------------------------------------------------------------------- what a model needs beside its weights
# a tissue-specific run's table: upper group -> the model directory of its cells
ROUTING_FILE = "tissue_specific.json"


def covariates_for(manifest: dict, obs: pd.DataFrame, source: str) -> Optional[np.ndarray]:
    """The one-hot a tissue-dependent model needs for the cells of ``obs`` (None for other models).

    Groups the model never saw get an all-zero one-hot, with a warning that counts them.
    """
    spec = manifest.get("covariates")
    if not spec:
        return None
    column, categories, scale = spec["column"], tuple(spec["categories"]), float(spec.get("scale", 1.0))
    if column not in obs.columns:
        raise ScnymError(f"this model is tissue-dependent and needs the query's {column!r} column (in the h5ad obs, "
                         f"loom column attributes or --training_metadata); {source} has none")
    groups = read_groups(obs, column, source)
    unseen = ~pd.Index(groups).isin(categories)
    if unseen.any():
        names = ", ".join(sorted(set(groups[unseen]))[:5])
        log.warning("%d query cells belong to %r groups the model never saw (%s): they get no tissue one-hot and "
                    "their predictions rest on expression alone", int(unseen.sum()), column, names)
    return one_hot(groups, categories, scale)


def routing_of(model_path: Path) -> Optional[dict]:
    """The routing table of a tissue-specific run directory, or None for any other model path."""
    path = Path(model_path) / ROUTING_FILE
    return json.loads(path.read_text()) if Path(model_path).is_dir() and path.is_file() else None
