"""Data layer: read inputs, normalize, align genes, attach labels, split, batch."""

from .genes import GeneOverlap, align_genes, drop_duplicate_genes, subset_genes
from .labels import UNKNOWN, UNLABELED, LabelEncoding, attach_metadata, read_labels
from .normalize import normalize
from .readers import CellMatrix, cells_from_anndata, read_expression, read_gene_list

__all__ = [
    "CellMatrix", "GeneOverlap", "LabelEncoding", "UNKNOWN", "UNLABELED", "align_genes", "attach_metadata",
    "cells_from_anndata", "drop_duplicate_genes", "normalize", "read_expression", "read_gene_list",
    "read_labels", "subset_genes",
]
