"""From config to model-ready data: read, attach metadata, normalize, clean genes, encode labels; and the query
to predict."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from ..config import Config
from ..data import (UNLABELED, CellMatrix, GeneOverlap, LabelEncoding, align_genes, attach_metadata,
                    drop_duplicate_genes, normalize, read_expression, read_gene_list, read_labels, subset_genes)
from ..data.genes import require_overlap, translate_for_model
from ..data.labels import join_metadata, missing_values, per_cell_strings, require_column, require_values
from ..data.normalize import DETECTION_ROWS, decide_kind
from ..data.stream import CellChunks, H5adChunks, InMemoryChunks, ShardedH5adChunks, is_anndata_store
from ..errors import ScnymError

log = logging.getLogger(__name__)


def load_cells(config: Config, path: Path, *, metadata: Optional[Path] = None, adata=None,
               gene_names_file: Optional[Path] = None, gene_names_option: str = "--input_gene_names",
               translate_to: Optional[Sequence[str]] = None) -> tuple[CellMatrix, str]:
    """Read one input and bring it to ln(CPM+1) over all of its genes, then drop duplicate genes.

    ``adata`` (an AnnData already in memory) replaces reading ``path``; it is never modified.
    ``gene_names_file`` defaults to ``config.input_gene_names``; ``translate_to`` (the genes of the model
    the data will be aligned to) applies ``config.gene_map`` / ``config.gene_species``.
    """
    if adata is not None:
        from ..data import cells_from_anndata

        cells = cells_from_anndata(adata, gene_column=config.gene_column, layer=config.input_layer,
                                   source=str(path))
        copy = True
    else:
        if gene_names_option == "--input_gene_names":  # the reference's (or query's) list; a target has its own
            gene_names_file = gene_names_file or config.input_gene_names
        cells = read_expression(path, gene_names_file=gene_names_file,
                                gene_column=config.gene_column, layer=config.input_layer,
                                gene_names_option=gene_names_option)
        copy = False  # freshly read: normalize in place
    if metadata is not None:
        cells = attach_metadata(cells, metadata)
    X, kind = normalize(cells.X, config.input_normalization, source=cells.source, copy=copy)
    log.info("%s: %d cells x %d genes", cells.source, cells.n_cells, len(cells.genes))
    cells = drop_duplicate_genes(cells.with_(X=X))
    if translate_to is not None:
        cells = drop_duplicate_genes(cells.with_(genes=translate_for_model(
            cells.genes, translate_to, gene_map=config.gene_map, gene_species=config.gene_species,
            what=cells.source)))
    return cells, kind


@dataclass
class TrainingInputs:
    """Reference cells (labeled) and target cells ('Unlabeled'), ready for the trainer.

    Rows are the reference file's cells, then the cells of ``--unlabeled_counts`` if given.
    """

    cells: CellMatrix
    labels: np.ndarray          # strings, one per cell; 'Unlabeled' for target cells
    encoding: LabelEncoding
    codes: np.ndarray           # class codes, -1 for 'Unlabeled'
    input_kind: str             # counts / log1p / ... / as_is (of the reference file)
    domains: np.ndarray         # domain code per cell
    domain_names: tuple[str, ...]
    target_overlap: Optional[GeneOverlap] = None
    gene_report: dict = field(default_factory=dict)  # how the training genes were chosen (counts)
    covariates: Optional[np.ndarray] = None         # one-hot of the upper group (tissue-dependent models)
    covariate_column: Optional[str] = None
    covariate_categories: tuple[str, ...] = ()
    covariate_scale: float = 1.0

    @property
    def labeled_rows(self) -> np.ndarray:
        return np.flatnonzero(self.codes >= 0)

    @property
    def unlabeled_rows(self) -> np.ndarray:
        return np.flatnonzero(self.codes < 0)


def _stack(reference: CellMatrix, target: CellMatrix) -> CellMatrix:
    import pandas as pd

    from ..data.stacked import stack_rows

    target_obs = target.obs.copy()
    clashes = target_obs.index.isin(reference.obs.index)
    if clashes.any():
        log.warning("%d target cell ids also occur in the reference; target ids get the suffix '-target'",
                    int(clashes.sum()))
        target_obs.index = [f"{i}-target" if c else i for i, c in zip(target_obs.index, clashes)]
    obs = pd.concat([reference.obs, target_obs], axis=0, join="outer")
    return CellMatrix(stack_rows(reference.X, target.X), reference.genes, obs, reference.source)


def assign_domains(config: Config, cells: CellMatrix, labels: np.ndarray, n_reference_rows: int
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Domain of every cell: --input_domain_group where given, else reference vs target.

    Cells of an --unlabeled_counts file without that column form one domain, 'target'.
    """
    if config.input_domain_group is None:
        names = np.array(["reference", "target"], dtype=object)[(labels == UNLABELED).astype(np.intp)]
    else:
        column = config.input_domain_group
        values = require_column(cells.obs, column, "--input_domain_group", str(config.input_counts))
        require_values(values, column, "--input_domain_group", str(config.input_counts), "give every cell a domain",
                       where=np.arange(cells.n_cells) < n_reference_rows)
        names = per_cell_strings(values, strip=False)
        names[missing_values(values)] = "target"
    # sorted domain names and each cell's code among them, looking at each distinct name once
    per_cell, uniques = pd.factorize(names)
    domain_names = sorted(map(str, uniques))
    codes = np.asarray(pd.Index(domain_names).get_indexer(pd.Index(list(map(str, uniques)), dtype=object)))[per_cell]
    log.info("domains: %s", ", ".join(f"{n} {c}" for n, c in zip(domain_names, np.bincount(codes))))
    return codes.astype(np.int64), tuple(domain_names)


BLOCK_ROWS = 8192
# what happens to reference genes the target lacks, by --shared_genes
MISSING_TARGET_GENES = {True: "are left out of training (--shared_genes)", False: "were set to 0 in the target"}


def _open_disk_part(config: Config, path: Path, offset: int, *, translate_to: Optional[Sequence[str]] = None):
    """A file as a DiskPart: its genes (translated to the naming of ``translate_to``), its normalization kind."""
    from ..data.disk import DiskPart
    from ..data.stream import H5adChunks

    reader = H5adChunks(path, layer=config.input_layer, gene_column=config.gene_column)
    genes = reader.genes
    if translate_to is not None:
        genes = translate_for_model(genes, translate_to, gene_map=config.gene_map,
                                    gene_species=config.gene_species, what=str(path))
    _, kind = normalize(reader.read(0, min(DETECTION_ROWS, reader.n_cells)), config.input_normalization,
                        source=str(path), copy=False)
    return DiskPart(reader, pd.Index(genes), kind, offset, config.input_normalization)


def load_training_inputs_backed(config: Config) -> TrainingInputs:
    """Like :func:`load_training_inputs`, but the matrix stays on disk (a DiskMatrix); only the
    per-cell metadata is loaded. Genes, normalization and labels are handled the same way."""
    from ..data.disk import DiskMatrix
    from ..data.labels import join_metadata, labels_from_obs
    from ..data.stream import h5ad_files

    parts, offset = [], 0
    for path in h5ad_files(config.path("input_counts")):
        parts.append(_open_disk_part(config, path, offset))
        offset += parts[-1].reader.n_cells
        if not parts[-1].source_genes.equals(parts[0].source_genes):
            raise ScnymError(f"shard {path} has other genes than {parts[0].reader.source}; all shards must have "
                             "the same genes in the same order")
    n_reference = offset
    obs = pd.concat([p.reader.obs for p in parts], axis=0, join="outer")
    if config.training_metadata is not None:
        obs = join_metadata(obs, config.training_metadata, str(config.input_counts))
    genes = pd.Index(parts[0].source_genes).drop_duplicates()
    if config.genes_to_use is not None:
        wanted = pd.Index(read_gene_list(config.genes_to_use, "--genes_to_use")).drop_duplicates()
        missing = wanted[~wanted.isin(genes)]
        if len(missing):
            raise ScnymError(f"{len(missing)} of {len(wanted)} genes in --genes_to_use are not in "
                             f"{config.input_counts} (e.g. {', '.join(missing[:5])}); remove them or check the naming")
        genes = wanted
    reference_obs = obs
    overlap = target_genes = None
    n_reference_parts = len(parts)
    if config.unlabeled_counts is not None:
        for path in h5ad_files(config.unlabeled_counts):
            part = _open_disk_part(config, path, offset, translate_to=genes)
            overlap = require_overlap(part.source_genes, genes, min_overlap=config.min_gene_overlap,
                                      what="unlabeled target data", source=str(path),
                                      missing_genes=MISSING_TARGET_GENES[config.shared_genes])
            target_genes = part.source_genes if target_genes is None else target_genes.intersection(
                part.source_genes)
            parts.append(part)
            offset += part.reader.n_cells
        if offset == n_reference:
            raise ScnymError(f"--unlabeled_counts {config.unlabeled_counts} holds no cells: there is nothing to "
                             "adapt to; give the target data, or leave --unlabeled_counts out to train supervised")
        target_obs = pd.concat([p.reader.obs for p in parts[n_reference_parts:]], axis=0)
        clashes = target_obs.index.isin(reference_obs.index)
        target_obs.index = [f"{i}-target" if c else i for i, c in zip(target_obs.index, clashes)]
        obs = pd.concat([reference_obs, target_obs], axis=0, join="outer")
    cache_blocks = 2 * max(1, config.read_buffer_cells // BLOCK_ROWS) + 2

    def datasets(candidates: pd.Index) -> list:  # one streamed pass over each side, for gene dispersions
        matrix = DiskMatrix(parts, candidates, block_rows=BLOCK_ROWS, cache_blocks=1)
        sides = [range(n_reference_parts), range(n_reference_parts, len(parts))]
        return [matrix.iter_blocks(side) for side in sides if len(side)]

    genes, gene_report = choose_genes(config, genes, target_genes, datasets)
    # the next window of shuffled blocks is read while the model trains on this one
    window_blocks = max(1, config.read_buffer_cells // BLOCK_ROWS)
    matrix = DiskMatrix(parts, genes, block_rows=BLOCK_ROWS, cache_blocks=cache_blocks,
                        read_ahead_blocks=window_blocks + 2)
    cells = CellMatrix(matrix, genes, obs, str(config.input_counts))
    reference_labels = labels_from_obs(reference_obs, config.lower_group, "--lower_group", str(config.input_counts))
    labels = np.concatenate([reference_labels, np.full(offset - n_reference, UNLABELED, dtype=object)])
    encoding = LabelEncoding.fit(labels, config.lower_group)
    codes = encoding.encode(labels)
    log.info("training from disk: %d reference and %d target cells in %d blocks of %d cells; %d labeled cells in "
             "%d classes", n_reference, offset - n_reference, len(matrix.block_bounds), BLOCK_ROWS,
             int((codes >= 0).sum()), len(encoding.classes))
    domains, domain_names = assign_domains(config, cells, labels, n_reference)
    return TrainingInputs(cells, labels, encoding, codes, parts[0].kind, domains, domain_names, overlap,
                          gene_report=gene_report)


def choose_genes(config: Config, genes: pd.Index, target_genes: Optional[pd.Index],
                 datasets: Callable[[pd.Index], list]) -> tuple[pd.Index, dict]:
    """The training genes: the reference's (after --genes_to_use), those the target has too (--shared_genes),
    then the --n_top_genes most variable; and a report of each step.

    ``datasets(genes)`` gives the reference's and the target's row blocks over ``genes`` (for the
    dispersions of highly variable genes).
    """
    report: dict = {"n_reference_genes": len(genes)}
    if target_genes is not None and config.shared_genes:
        shared = genes[genes.isin(target_genes)]
        report["n_shared_genes"] = len(shared)
        if len(shared) < len(genes):
            log.info("training on the %d genes that the reference (%d genes) and the target data share "
                     "(--shared_genes)", len(shared), len(genes))
        genes = shared
    if config.n_top_genes is not None and config.genes_to_use is None and config.n_top_genes < len(genes):
        from ..data.gene_selection import highly_variable_genes

        sides = datasets(genes)
        chosen = highly_variable_genes(sides[:1] if config.variable_in == "reference" else sides, len(genes),
                                       config.n_top_genes)
        log.info("training on %d highly variable genes of %d (--n_top_genes)", len(chosen), len(genes))
        genes = genes[chosen]
        report["n_highly_variable_genes"] = len(genes)
    report["n_training_genes"] = len(genes)
    return genes, report


def load_training_inputs(config: Config, adata=None) -> TrainingInputs:
    """Reference (+ target) cells as configured: normalized, genes chosen, labels encoded, domains.

    ``adata`` (the Python API) stands for the --input_counts file, and is never modified: every other key
    (metadata, gene lists and maps, unlabeled target files) applies as it does to a file.
    """
    if config.backed:
        if adata is not None:
            raise ScnymError("--backed true reads --input_counts from disk in blocks: it needs an h5ad path, "
                             "not an AnnData in memory (use anndata.read_h5ad(path, backed='r') and the command "
                             "line, or leave backed off)")
        return load_training_inputs_backed(config)
    source = config.path("input_counts") if adata is None else Path("adata")
    cells, kind = load_cells(config, source, metadata=config.training_metadata, adata=adata)
    labels = read_labels(cells, config.lower_group)
    if config.genes_to_use is not None:
        cells = subset_genes(cells, read_gene_list(config.genes_to_use, "--genes_to_use"))
    encoding = LabelEncoding.fit(labels, config.lower_group)
    n_reference = cells.n_cells
    overlap = target = None
    if config.unlabeled_counts is not None:
        target, _ = load_cells(config, config.unlabeled_counts, gene_names_file=config.unlabeled_genes,
                               gene_names_option="--unlabeled_genes", translate_to=cells.genes)
        if target.n_cells == 0:
            raise ScnymError(f"--unlabeled_counts {config.unlabeled_counts} holds no cells: there is nothing to "
                             "adapt to; give the target data, or leave --unlabeled_counts out to train supervised")
        overlap = require_overlap(target.genes, cells.genes, min_overlap=config.min_gene_overlap,
                                  what="unlabeled target data", source=target.source,
                                  missing_genes=MISSING_TARGET_GENES[config.shared_genes])

    def datasets(genes: pd.Index) -> list:
        sides = [cells] if target is None else [cells, target]
        return [[align_genes(side, genes, min_overlap=0.0, what=side.source, report=False)[0].X] for side in sides]

    genes, gene_report = choose_genes(config, cells.genes, None if target is None else target.genes, datasets)
    if not genes.equals(cells.genes):
        cells = subset_genes(cells, genes, what="the training genes")
    if target is not None:
        target, _ = align_genes(target, genes, min_overlap=0.0, what="unlabeled target data", report=False)
        cells = _stack(cells, target)
        labels = np.concatenate([labels, np.full(target.n_cells, UNLABELED, dtype=object)])
    codes = encoding.encode(labels)
    counts = np.bincount(codes[codes >= 0], minlength=len(encoding.classes))
    log.info("%d labeled cells in %d classes: %s; %d unlabeled target cells", int((codes >= 0).sum()),
             len(encoding.classes), ", ".join(f"{c} {n}" for c, n in zip(encoding.classes, counts)),
             int((codes < 0).sum()))
    domains, domain_names = assign_domains(config, cells, labels, n_reference)
    return TrainingInputs(cells, labels, encoding, codes, kind, domains, domain_names, overlap,
                          gene_report=gene_report)


# ---------------------------------------------------------------------- a query to predict
def open_query(config: Config, path: Path, adata=None) -> CellChunks:
    """The query as raw blocks: streamed from an h5ad file, else read into memory (or the given AnnData)."""
    if adata is not None:
        from ..data import cells_from_anndata

        cells = cells_from_anndata(adata, gene_column=config.gene_column, layer=config.input_layer, source=str(path))
        source: CellChunks = InMemoryChunks(cells)
    elif is_anndata_store(path):   # .h5ad file or .zarr store: streamed
        source = H5adChunks(path, layer=config.input_layer, gene_column=config.gene_column)
    elif Path(path).is_dir() and any(is_anndata_store(p) for p in Path(path).iterdir()):
        source = ShardedH5adChunks(path, layer=config.input_layer, gene_column=config.gene_column)
    else:
        source = InMemoryChunks(read_expression(path, gene_names_file=config.input_gene_names,
                                                gene_column=config.gene_column, layer=config.input_layer))
    if config.training_metadata is not None:
        obs = join_metadata(source.obs, config.training_metadata, source.source)
        if isinstance(source, InMemoryChunks):
            source = InMemoryChunks(source.cells.with_(obs=obs))
        elif isinstance(source, (H5adChunks, ShardedH5adChunks)):
            source.obs = obs
    return source


def query_genes(config: Config, source: CellChunks, model_genes: Sequence[str]) -> pd.Index:
    """The query's gene names, translated through --gene_map or --gene_species when given."""
    return translate_for_model(pd.Index(source.genes), model_genes, gene_map=config.gene_map,
                               gene_species=config.gene_species, what=source.source)


def query_kind(source: CellChunks, config: Config, announce: bool = True) -> str:
    """The query's normalization, decided on its first cells like any dataset's (data/normalize.py), read a
    chunk at a time (memory follows the chunk)."""
    first_chunks = (block for _, block in source.chunks(config.prediction_chunk_size))
    return decide_kind(first_chunks, config.input_normalization, source=source.source, announce=announce)
