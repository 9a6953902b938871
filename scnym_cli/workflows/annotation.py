"""Predictions written into an AnnData, scanpy style: obs columns, obsm arrays, and what made them in uns."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .predictor import Predictions


def obs_fields(key: str, labels: np.ndarray, confidence: np.ndarray, extra: dict[str, np.ndarray]) -> dict:
    """The obs columns of predictions: ``key`` (categorical), ``key_confidence`` and ``key_<name>`` of each
    extra column (novelty, disagreement, prediction_set (categorical), set_size). The command line's annotated
    copy writes the same columns block by block (workflows/predict.py)."""
    return {key: pd.Categorical(labels), f"{key}_confidence": confidence,
            **{f"{key}_{name}": pd.Categorical(values) if name == "prediction_set" else values
               for name, values in extra.items()}}


def annotate(adata, *, key: str, predictions: "Predictions") -> None:
    """Write predictions into an AnnData (in place), scanpy style."""
    for name, values in obs_fields(key, predictions.labels, predictions.confidence, predictions.extra).items():
        adata.obs[name] = values
    adata.obsm[f"{key}_probabilities"] = predictions.probabilities.astype(np.float32)
    if predictions.embedding is not None:
        adata.obsm["X_scnym"] = predictions.embedding.astype(np.float32)
    adata.uns[f"{key}_classes"] = list(predictions.classes)
    adata.uns[key] = uns_safe(predictions.provenance)


def uns_safe(value: Any) -> Any:
    """Values an h5ad / zarr ``uns`` can store: None dropped from dicts (and spelled 'None' in lists), paths
    as text."""
    if isinstance(value, dict):
        return {str(k): uns_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [("None" if v is None else uns_safe(v)) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
