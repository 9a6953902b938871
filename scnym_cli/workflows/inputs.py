"""From config to model-ready data: read, attach metadata, normalize, clean genes, encode labels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config
from ..data import (CellMatrix, LabelEncoding, attach_metadata, drop_duplicate_genes, normalize, read_expression,
                    read_gene_list, read_labels, subset_genes)
from ..train.device import resolve_device

log = logging.getLogger(__name__)


def setup_runtime(config: Config) -> torch.device:
    """Resolve the device and the CPU thread count, once per command."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    log.info("device: %s (%d CPU threads)", device, torch.get_num_threads())
    return device


def load_cells(config: Config, path: Path, *, metadata: Optional[Path] = None, adata=None) -> tuple[CellMatrix, str]:
    """Read one input and bring it to ln(CPM+1) over all of its genes, then drop duplicate genes.

    ``adata`` (an AnnData already in memory) replaces reading ``path``; it is never modified.
    """
    if adata is not None:
        from ..data import cells_from_anndata

        cells = cells_from_anndata(adata, gene_column=config.gene_column, layer=config.input_layer,
                                   source=str(path))
        copy = True
    else:
        cells = read_expression(path, gene_names_file=config.input_gene_names, gene_column=config.gene_column,
                                layer=config.input_layer)
        copy = False  # freshly read: normalize in place
    if metadata is not None:
        cells = attach_metadata(cells, metadata)
    X, kind = normalize(cells.X, config.input_normalization, source=cells.source, copy=copy)
    log.info("%s: %d cells x %d genes", cells.source, cells.n_cells, len(cells.genes))
    return drop_duplicate_genes(cells.with_(X=X)), kind


@dataclass
class TrainingInputs:
    """Labeled reference cells, ready for the trainer."""

    cells: CellMatrix
    labels: np.ndarray          # strings, one per cell
    encoding: LabelEncoding
    codes: np.ndarray           # class codes, -1 for 'Unlabeled'
    input_kind: str             # counts / log1p / as_is

    @property
    def labeled_rows(self) -> np.ndarray:
        return np.flatnonzero(self.codes >= 0)


def load_training_inputs(config: Config) -> TrainingInputs:
    cells, kind = load_cells(config, config.input_counts, metadata=config.training_metadata)
    labels = read_labels(cells, config.lower_group)
    if config.genes_to_use is not None:
        cells = subset_genes(cells, read_gene_list(config.genes_to_use, "--genes_to_use"))
    encoding = LabelEncoding.fit(labels, config.lower_group)
    codes = encoding.encode(labels)
    counts = np.bincount(codes[codes >= 0], minlength=len(encoding.classes))
    log.info("%d labeled cells in %d classes: %s", int((codes >= 0).sum()), len(encoding.classes),
             ", ".join(f"{c} {n}" for c, n in zip(encoding.classes, counts)))
    return TrainingInputs(cells, labels, encoding, codes, kind)
