"""Read expression matrices (h5ad, loom, CSV, 10x mtx) into one representation.

Every reader returns a :class:`CellMatrix`: a float32 CSR matrix (cells x genes), the gene
names, and per-cell metadata indexed by cell id. Sparse inputs are never densified; dense
inputs (CSV) are converted to CSR chunk by chunk.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ..errors import ScnymError
from .matrix import Matrix

log = logging.getLogger(__name__)

LOOM_GENE_ATTRIBUTES = ("Gene", "gene", "gene_names", "var_names", "gene_symbols", "Accession")
LOOM_CELL_ATTRIBUTES = ("CellID", "cell_id", "obs_names", "cell", "barcode")
CSV_CHUNK_ROWS = 20_000


@dataclass(frozen=True)
class CellMatrix:
    """Cells x genes expression with gene names and per-cell metadata.

    Attributes
    ----------
    X
        float32 CSR matrix, cells x genes.
    genes
        Gene names, one per column (strings).
    obs
        Per-cell metadata, indexed by cell id (strings), one row per matrix row.
    source
        Where the data came from (for messages).
    """

    X: Matrix                       # CSR once read; stacked with target cells for training
    genes: pd.Index
    obs: pd.DataFrame
    source: str

    def __post_init__(self) -> None:
        if self.X.shape != (len(self.obs), len(self.genes)):
            raise ValueError(f"matrix {self.X.shape} vs {len(self.obs)} cells and {len(self.genes)} genes")

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def cell_ids(self) -> pd.Index:
        return self.obs.index

    def with_(self, **changes) -> "CellMatrix":
        return replace(self, **changes)

    def subset_cells(self, rows: np.ndarray) -> "CellMatrix":
        return CellMatrix(self.X[rows], self.genes, self.obs.iloc[rows], self.source)


def as_csr32(X) -> sp.csr_matrix:
    """float32 CSR without copying when it already is one."""
    if sp.issparse(X):
        X = X.tocsr()
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        return X
    array = np.asarray(X)
    if array.ndim != 2:
        raise ScnymError(f"expression matrix must be 2-dimensional, got shape {array.shape}")
    return sp.csr_matrix(array.astype(np.float32, copy=False))


def read_gene_list(path: Path, what: str) -> list[str]:
    """One name per line (blank lines ignored); a trailing CSV column is ignored."""
    path = Path(path)
    try:
        lines = [line.strip().split(",")[0].strip().strip('"') for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ScnymError(f"could not read {what} {path}: {e}") from None
    names = [n for n in lines if n]
    if not names:
        raise ScnymError(f"{what} {path} is empty; it needs one gene name per line")
    return names


def is_zarr_store(path: Path) -> bool:
    """An AnnData zarr store: a ``.zarr`` directory (zarr v2 or v3 layout)."""
    path = Path(path)
    return path.is_dir() and (path.name.lower().endswith(".zarr") or (path / "zarr.json").is_file()
                              or (path / ".zgroup").is_file())


def read_expression(
    path: Path,
    *,
    gene_names_file: Optional[Path] = None,
    gene_column: Optional[str] = None,
    layer: Optional[str] = None,
    gene_names_option: str = "--input_gene_names",
) -> CellMatrix:
    """Read an expression matrix of any supported format (gene names checked, cell ids as strings).

    Parameters
    ----------
    path
        ``.h5ad``, ``.loom``, ``.csv``/``.tsv`` (optionally gzipped) or a 10x mtx directory.
    gene_names_file
        One gene per line; overrides (and must match the length of) the file's own names.
    gene_column
        h5ad var column / loom row attribute / 10x features column holding gene names.
    layer
        h5ad/loom layer to read instead of the main matrix (``raw`` = h5ad ``.raw``).
    gene_names_option
        The option that gives ``gene_names_file`` (for messages: --unlabeled_genes for a target file).
    """
    path = Path(path)
    if not path.exists():
        raise ScnymError(f"input {path} does not exist; check the path")
    name = path.name.lower()
    if is_zarr_store(path):
        X, genes, obs = _read_anndata_store(path, gene_column, layer)
    elif path.is_dir():
        X, genes, obs = _read_10x_mtx(path, gene_column)
    elif name.endswith(".h5ad"):
        X, genes, obs = _read_anndata_store(path, gene_column, layer)
    elif name.endswith(".loom"):
        X, genes, obs = _read_loom(path, gene_column, layer)
    elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        if layer:
            raise ScnymError(f"--input_layer {layer!r} does not apply to a CSV file ({path}); remove it")
        X, genes, obs = _read_csv(path)
    else:
        raise ScnymError(
            f"unsupported input format {path.name!r}; give a .h5ad, .loom, .csv/.tsv file, a .zarr AnnData store "
            "or a 10x mtx directory")

    option = gene_names_option
    if gene_names_file is not None:
        names = read_gene_list(gene_names_file, option)
        if len(names) != X.shape[1]:
            raise ScnymError(
                f"{option} has {len(names)} names but {path.name} has {X.shape[1]} genes (columns); "
                "give one name per column, in column order")
        names = pd.Index(names)
        if genes is not None and not _numbered(genes) and not names.equals(pd.Index(genes).astype(str)):
            column = int(np.flatnonzero(names != pd.Index(genes).astype(str))[0])
            raise ScnymError(f"{path.name} names its genes and {option} names them otherwise (column {column + 1}: "
                             f"{genes[column]!r} in the file, {names[column]!r} in the list); remove {option} or "
                             "fix it, so that no gene is silently renamed")
        genes = names
    elif genes is None:
        raise ScnymError(f"{path.name} has no gene names; pass them with {option} (one per line)")
    return _with_clean_names(X, genes, obs, str(path))


def _numbered(names: pd.Index) -> bool:
    """Names that are only positions (0, 1, 2, ...: what AnnData gives a matrix without gene names)."""
    return bool((pd.Index(names).astype(str) == pd.Index(map(str, range(len(names))))).all())


# cell ids handled at a time (hashed when checking that they are unique, read from an AnnData store by
# data/stream.py): each slice is briefly a list of Python strings
ID_SLICE = 262_144


def require_unique_cell_ids(ids: pd.Index, source: str) -> None:
    """Every output row is keyed by its cell id (predictions.csv, the fold tables, annotated.h5ad): ids given
    twice would make two cells one. :func:`require_unique_id_slices` over the ids in memory."""
    def slices() -> Iterator[np.ndarray]:
        for start in range(0, len(ids), ID_SLICE):
            yield np.asarray(ids[start:start + ID_SLICE], dtype=object)

    require_unique_id_slices(slices, len(ids), source)


def require_unique_id_slices(slices: Callable[[], Iterable[np.ndarray]], n_cells: int, source: str) -> None:
    """The same check over ids that are not held: ``slices()`` gives them a slice at a time (e.g. read from an
    AnnData store; str, or UTF-8 bytes, the same kind throughout), once, and again only if two hashes meet.

    The ids are hashed into 8 bytes each and the hashes sorted in place: a hash table of the ids themselves
    (Index.has_duplicates, Series.duplicated) took ~100 B a cell (0.5 GB at 5 million cells, the peak of
    opening an atlas) and 3x as long. Only ids whose hashes meet are compared as strings."""
    hashes = np.empty(n_cells, dtype=np.uint64)
    start = 0
    for piece in slices():
        hashes[start:start + len(piece)] = pd.util.hash_array(piece, categorize=False)
        start += len(piece)
    hashes.sort()
    shared = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    if len(shared) == 0:
        return
    candidates = pd.Index([value.decode() if isinstance(value, bytes) else str(value) for value in np.concatenate(
        [piece[np.isin(pd.util.hash_array(piece, categorize=False), shared)] for piece in slices()])], dtype=object)
    repeated = candidates[candidates.duplicated()].unique()
    if len(repeated):
        raise ScnymError(f"{source} has {len(repeated)} cell ids given more than once (e.g. "
                         f"{', '.join(map(str, repeated[:3]))}); make them unique (in Python: "
                         "adata.obs_names_make_unique()) so that each output row names one cell")


def _with_clean_names(X: sp.csr_matrix, genes: pd.Index, obs: pd.DataFrame, source: str) -> CellMatrix:
    if pd.Index(genes).isna().any() or (pd.Index(genes).astype(str).str.strip() == "").any():
        raise ScnymError(f"{source} has empty gene names; fix the gene names or pass --input_gene_names")
    obs = obs.copy()
    obs.index = pd.Index(obs.index.astype(str), name=None)
    require_unique_cell_ids(obs.index, source)
    return CellMatrix(X, pd.Index(genes).astype(str), obs, source)


# ---------------------------------------------------------------------- h5ad
def _read_anndata_store(path: Path, gene_column: Optional[str], layer: Optional[str]):
    """An .h5ad file or a .zarr AnnData store, read whole."""
    import anndata

    zarr_store = is_zarr_store(path)
    try:
        adata = anndata.read_zarr(path) if zarr_store else anndata.read_h5ad(path)
    except Exception as e:  # h5py/zarr/anndata raise many types for damaged files
        raise ScnymError(f"could not read {path} as {'a zarr store' if zarr_store else 'h5ad'} "
                         f"({type(e).__name__}: {e}); is it complete?") from None
    cells = cells_from_anndata(adata, gene_column=gene_column, layer=layer, source=str(path))
    return cells.X, cells.genes, cells.obs


def cells_from_anndata(adata, *, gene_column: Optional[str] = None, layer: Optional[str] = None,
                       source: str = "AnnData") -> CellMatrix:
    """The chosen matrix of an AnnData (X, a layer, or ``raw``) as a :class:`CellMatrix`."""
    var = adata.var
    if layer is None:
        X = adata.X
    elif layer == "raw":
        if adata.raw is None:
            raise ScnymError(f"{source} has no .raw; choose --input_layer from {sorted(adata.layers.keys())} or none")
        X, var = adata.raw.X, adata.raw.var
    elif layer in adata.layers:
        X = adata.layers[layer]
    else:
        raise ScnymError(
            f"layer {layer!r} not in {source}; available: {sorted(adata.layers.keys()) or 'none'}"
            f"{' and raw' if adata.raw is not None else ''}")
    if X is None:
        raise ScnymError(f"{source} has no expression matrix in X; choose one with --input_layer")
    if gene_column is None:
        genes = pd.Index(var.index)
    elif gene_column in var.columns:
        genes = pd.Index(var[gene_column].astype(str))
    else:
        raise ScnymError(f"gene column {gene_column!r} not in {source} var columns {list(var.columns)}")
    return _with_clean_names(as_csr32(X), genes, adata.obs, source)


# ---------------------------------------------------------------------- loom
def _read_loom(path: Path, gene_column: Optional[str], layer: Optional[str]):
    import loompy

    try:
        connection = loompy.connect(str(path), mode="r", validate=False)
    except Exception as e:
        raise ScnymError(f"could not read {path} as loom ({type(e).__name__}: {e}); is the file complete?") from None
    with connection as ds:
        layer_name = "" if layer is None else layer
        if layer_name not in ds.layers.keys():
            raise ScnymError(f"layer {layer!r} not in {path}; available: {[k for k in ds.layers.keys() if k]}")
        # loom stores genes x cells
        X = as_csr32(ds.layers[layer_name].sparse().T)
        row_attrs = list(ds.ra.keys())
        col_attrs = {k: ds.ca[k] for k in ds.ca.keys()}
        if gene_column is not None:
            if gene_column not in row_attrs:
                raise ScnymError(f"gene attribute {gene_column!r} not in {path} row attributes {row_attrs}")
            genes = pd.Index(ds.ra[gene_column].astype(str))
        else:
            found = next((a for a in LOOM_GENE_ATTRIBUTES if a in row_attrs), None)
            genes = pd.Index(ds.ra[found].astype(str)) if found else None
    id_attr = next((a for a in LOOM_CELL_ATTRIBUTES if a in col_attrs), None)
    index = col_attrs[id_attr].astype(str) if id_attr else [f"cell_{i}" for i in range(X.shape[0])]
    obs = pd.DataFrame({k: v for k, v in col_attrs.items() if np.ndim(v) == 1 and k != id_attr}, index=index)
    return X, genes, obs


# ---------------------------------------------------------------------- CSV
def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.name.lower().endswith(".gz") else open(path, "r")


def _read_csv(path: Path):
    """Dense cells x genes CSV/TSV, with or without a header row and a cell-id column."""
    try:
        with _open_text(path) as handle:
            first, second = handle.readline(), handle.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise ScnymError(f"could not read {path} as text ({e})") from None
    if not first.strip():
        raise ScnymError(f"{path} is empty")
    sep = "\t" if first.count("\t") > first.count(",") else ","
    first_fields = [f.strip().strip('"') for f in first.rstrip("\n\r").split(sep)]
    body_fields = [f.strip().strip('"') for f in (second or first).rstrip("\n\r").split(sep)]
    has_index = bool(body_fields) and not _is_number(body_fields[0])
    data_start = 1 if has_index else 0
    has_header = not all(_is_number(f) for f in first_fields[data_start:]) or (has_index and first_fields[0] == "")
    try:
        reader = pd.read_csv(
            path, sep=sep, header=0 if has_header else None, index_col=0 if has_index else None,
            chunksize=CSV_CHUNK_ROWS, dtype=None, low_memory=False,
        )
        blocks: list[sp.csr_matrix] = []
        ids: list[str] = []
        columns: Optional[pd.Index] = None
        for chunk in reader:
            columns = chunk.columns
            try:
                values = chunk.to_numpy(dtype=np.float32)
            except (ValueError, TypeError):
                bad = chunk.apply(pd.to_numeric, errors="coerce").isna() & chunk.notna()
                row, col = np.argwhere(bad.to_numpy())[0]
                raise ScnymError(
                    f"{path} has a non-numeric value {chunk.iat[row, col]!r} (cell {chunk.index[row]!r}, "
                    f"column {chunk.columns[col]!r}); the CSV must be cells x genes numbers") from None
            blocks.append(sp.csr_matrix(values))
            ids.extend(chunk.index.astype(str) if has_index else [])
    except pd.errors.ParserError as e:
        raise ScnymError(f"could not parse {path} as CSV ({str(e).splitlines()[0]})") from None
    if not blocks:
        raise ScnymError(f"{path} holds no cells")
    X = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    if not has_index:
        ids = [f"cell_{i}" for i in range(X.shape[0])]
    obs = pd.DataFrame(index=pd.Index(ids))
    return as_csr32(X), (pd.Index(columns.astype(str)) if has_header and columns is not None else None), obs


# ---------------------------------------------------------------------- 10x mtx
def _find(directory: Path, *stems: str) -> Optional[Path]:
    for stem in stems:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.exists():
                return candidate
    return None


def _read_10x_mtx(directory: Path, gene_column: Optional[str]):
    matrix_file = _find(directory, "matrix.mtx")
    features_file = _find(directory, "features.tsv", "genes.tsv")
    barcodes_file = _find(directory, "barcodes.tsv")
    if matrix_file is None or features_file is None or barcodes_file is None:
        raise ScnymError(
            f"{directory} is not a 10x mtx directory: it needs matrix.mtx, features.tsv (or genes.tsv) "
            "and barcodes.tsv (optionally .gz)")
    try:
        X = scipy.io.mmread(str(matrix_file))
        features = pd.read_csv(features_file, sep="\t", header=None)
        barcodes = pd.read_csv(barcodes_file, sep="\t", header=None)[0].astype(str)
    except Exception as e:
        raise ScnymError(f"could not read the 10x files in {directory} ({type(e).__name__}: {e})") from None
    X = as_csr32(sp.csr_matrix(X).T)  # mtx is genes x cells
    columns = {"gene_ids": 0, "gene_symbols": 1 if features.shape[1] > 1 else 0}
    if gene_column is not None and gene_column not in columns:
        raise ScnymError(f"for a 10x directory --gene_column must be gene_ids or gene_symbols, got {gene_column!r}")
    genes = pd.Index(features[columns[gene_column or "gene_symbols"]].astype(str))
    if X.shape != (len(barcodes), len(genes)):
        raise ScnymError(f"{directory}: matrix {X.shape[::-1]} does not match {len(genes)} features x "
                         f"{len(barcodes)} barcodes")
    return X, genes, pd.DataFrame(index=pd.Index(barcodes))
