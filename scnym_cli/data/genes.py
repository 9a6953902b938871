"""Gene names: de-duplication, subsetting and alignment to a model's gene order.

Alignment reorders columns to the model's genes, fills missing genes with zeros and drops
extra genes by rewriting CSR column indices (no densification), and always reports the
overlap. Below a minimum overlap it stops and says what matched.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ScnymError
from .readers import CellMatrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneOverlap:
    """How the data's genes cover the model's genes."""

    n_model_genes: int
    n_found: int
    n_missing: int
    n_extra: int
    fraction_found: float
    missing_examples: tuple[str, ...]

    def describe(self) -> str:
        return (f"found {self.n_found} of {self.n_model_genes} model genes ({self.fraction_found:.1%}); "
                f"{self.n_missing} missing (set to 0), {self.n_extra} extra genes ignored")

    def to_dict(self) -> dict:
        return asdict(self)


def drop_duplicate_genes(cells: CellMatrix) -> CellMatrix:
    """Keep the first column of each duplicated gene name (with a warning)."""
    duplicated = cells.genes.duplicated()
    if not duplicated.any():
        return cells
    examples = ", ".join(pd.unique(cells.genes[duplicated])[:5])
    log.warning("%s: %d duplicated gene names (e.g. %s); keeping the first column of each",
                cells.source, int(duplicated.sum()), examples)
    keep = np.flatnonzero(~duplicated)
    return cells.with_(X=cells.X[:, keep], genes=cells.genes[keep])


def subset_genes(cells: CellMatrix, genes: Sequence[str], what: str = "--genes_to_use") -> CellMatrix:
    """Restrict to ``genes`` in that order; every one must be present."""
    wanted = pd.Index([str(g) for g in genes])
    if wanted.has_duplicates:
        wanted = wanted.drop_duplicates()
    positions = cells.genes.get_indexer(wanted)
    missing = wanted[positions < 0]
    if len(missing):
        raise ScnymError(
            f"{len(missing)} of {len(wanted)} genes in {what} are not in {cells.source} "
            f"(e.g. {', '.join(missing[:5])}); remove them or check the gene naming")
    return cells.with_(X=cells.X[:, positions], genes=wanted)


def reindex_columns(X: sp.csr_matrix, source_genes: pd.Index, target_genes: pd.Index) -> sp.csr_matrix:
    """Columns of X (named ``source_genes``) rearranged to ``target_genes``; absent genes are 0.

    Only the CSR index arrays are rewritten: cost is O(nnz), memory one copy of the kept entries.
    """
    target_position = pd.Index(target_genes).get_indexer(pd.Index(source_genes)).astype(np.int32)
    if pd.Index(source_genes).has_duplicates:
        # the first occurrence of a duplicated source gene wins
        target_position[pd.Index(source_genes).duplicated()] = -1
    new_columns = target_position[X.indices]
    keep = new_columns >= 0
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=X.indptr.dtype)])
    indptr = kept_before[X.indptr].astype(X.indptr.dtype)
    out = sp.csr_matrix((X.data[keep], new_columns[keep].astype(X.indices.dtype), indptr),
                        shape=(X.shape[0], len(target_genes)))
    out.has_sorted_indices = False
    out.sort_indices()
    return out


def measure_overlap(data_genes: pd.Index, model_genes: pd.Index) -> GeneOverlap:
    found = pd.Index(model_genes).isin(pd.Index(data_genes))
    n_found = int(found.sum())
    return GeneOverlap(
        n_model_genes=len(model_genes),
        n_found=n_found,
        n_missing=len(model_genes) - n_found,
        n_extra=int((~pd.Index(data_genes).isin(pd.Index(model_genes))).sum()),
        fraction_found=n_found / max(len(model_genes), 1),
        missing_examples=tuple(pd.Index(model_genes)[~found][:10]),
    )


def require_overlap(data_genes: pd.Index, model_genes: Sequence[str], *, min_overlap: float, what: str,
                    source: str, missing_genes: str = "were set to 0") -> GeneOverlap:
    """Measure and report the overlap; stop, saying what matched, below ``min_overlap``."""
    model_genes = pd.Index([str(g) for g in model_genes])
    overlap = measure_overlap(data_genes, model_genes)
    if overlap.fraction_found < min_overlap or overlap.n_found == 0:
        raise ScnymError(
            f"only {overlap.n_found} of {overlap.n_model_genes} model genes ({overlap.fraction_found:.1%}) are in "
            f"the {what} ({source}; minimum {min_overlap:.0%}); data genes look like '{', '.join(data_genes[:3])}', "
            f"model genes like '{', '.join(model_genes[:3])}': check the gene naming (symbols vs Ensembl ids, "
            "species) or lower --min_gene_overlap")
    log.info("%s: %s", what, overlap.describe())
    if overlap.n_missing and overlap.fraction_found < 0.9:
        log.warning("%s: %d model genes are missing and %s (e.g. %s)", what, overlap.n_missing, missing_genes,
                    ", ".join(overlap.missing_examples[:5]))
    return overlap


def align_genes(cells: CellMatrix, model_genes: Sequence[str], *, min_overlap: float = 0.5,
                what: str = "data", report: bool = True) -> tuple[CellMatrix, GeneOverlap]:
    """Reorder ``cells`` to the model's genes, report the overlap (unless ``report`` is False: an overlap
    already reported), stop below ``min_overlap``."""
    model_genes = pd.Index([str(g) for g in model_genes])
    overlap = (require_overlap(cells.genes, model_genes, min_overlap=min_overlap, what=what, source=cells.source)
               if report else measure_overlap(cells.genes, model_genes))
    if cells.genes.equals(model_genes):
        return cells, overlap
    X = reindex_columns(cells.X, cells.genes, model_genes)
    return cells.with_(X=X, genes=model_genes), overlap


@dataclass(frozen=True)
class GeneMapReport:
    """What a gene-name translation did to one input."""

    n_genes: int
    n_mapped: int
    n_unmapped: int
    n_collapsed: int  # mapped onto a name another gene already had (first kept)

    def describe(self) -> str:
        return (f"--gene_map translated {self.n_mapped} of {self.n_genes} gene names; {self.n_unmapped} had no "
                f"entry and kept their name; {self.n_collapsed} duplicates after translation were dropped")


def read_gene_map(path) -> dict[str, str]:
    """A 'from,to' CSV (header optional; extra columns ignored) as a dict; the first entry of a name wins."""
    try:
        table = pd.read_csv(path, header=None, dtype=str, sep=None, engine="python")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ScnymError(f"could not read --gene_map {path} ({str(e).splitlines()[0]})") from None
    if table.shape[1] < 2:
        raise ScnymError(f"--gene_map {path} needs two columns, 'from' and 'to' (e.g. mouse,human); it has "
                         f"{table.shape[1]}")
    table = table.iloc[:, :2].dropna()
    table = table[(table.iloc[:, 0].str.strip() != "") & (table.iloc[:, 1].str.strip() != "")]
    mapping = dict(zip(table.iloc[::-1, 0].str.strip(), table.iloc[::-1, 1].str.strip()))
    if not mapping:
        raise ScnymError(f"--gene_map {path} holds no 'from,to' pairs")
    return mapping


def translate_gene_names(genes: pd.Index, mapping: dict[str, str], what: str) -> tuple[pd.Index, GeneMapReport]:
    """Gene names through the map; unmapped names stay; a map that translates nothing is an error."""
    n_mapped = int(genes.isin(list(mapping)).sum())
    if n_mapped == 0:
        raise ScnymError(
            f"--gene_map translates none of the {len(genes)} gene names of {what} (names look like "
            f"'{', '.join(genes[:3])}', the map's 'from' column like '{', '.join(list(mapping)[:3])}'); check the "
            "map's direction and naming")
    translated = pd.Index(genes.map(lambda g: mapping.get(g, g)))
    report = GeneMapReport(len(genes), n_mapped, len(genes) - n_mapped, int(translated.duplicated().sum()))
    log.info("%s: %s", what, report.describe())
    return translated, report


def apply_gene_map(cells: CellMatrix, mapping: dict[str, str], what: str) -> tuple[CellMatrix, GeneMapReport]:
    """Translate the gene names of ``cells``; names that collide after translation keep their first column."""
    translated, report = translate_gene_names(cells.genes, mapping, what)
    return drop_duplicate_genes(cells.with_(genes=translated)), report


def translate_for_model(genes: pd.Index, model_genes: Sequence[str], *, gene_map=None,
                        gene_species: Optional[str] = None, what: str) -> pd.Index:
    """The data's gene names in the model's naming: through --gene_map or --gene_species, else unchanged."""
    if gene_map is not None:
        return translate_gene_names(pd.Index(genes), read_gene_map(gene_map), what)[0]
    if gene_species is not None:
        from .orthologs import translate_species

        return translate_species(pd.Index(genes), gene_species, model_genes, what)[0]
    return pd.Index(genes)
