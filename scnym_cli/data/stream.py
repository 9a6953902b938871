"""Cells in chunks: from a matrix in memory, or streamed from an h5ad file on disk.

An h5ad file (or zarr store) is read with h5py (zarr): gene names are loaded; the expression matrix
(X, a layer, or raw.X) and the per-cell metadata (ids, the columns asked for) are read a block of rows
at a time, so memory is bounded by the chunk size whatever the file's size. The whole obs is read only
when something needs it whole (tissue groups, covariates, training). Matrices stored as CSC are read
whole (row blocks of CSC are not contiguous on disk).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from ..errors import ScnymError
from .readers import ID_SLICE, CellMatrix, as_csr32, is_zarr_store, require_unique_id_slices


T = TypeVar("T")


def in_background(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """``items``, made by a background thread up to ``depth`` ahead of their use: the next block of a streamed
    query is read and normalized while the model predicts this one (h5py and numpy release the GIL while they
    work). The order is kept; an error is raised where the item would have come; a consumer that stops early
    stops the thread."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, end))
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, raised there
            put((False, error))

    thread = threading.Thread(target=produce, name="scnym-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = handoff.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class CellChunks(Protocol):
    """What prediction needs of its input: gene names, metadata, and raw rows in blocks."""

    @property
    def genes(self) -> pd.Index: ...

    @property
    def obs(self) -> pd.DataFrame: ...

    @property
    def runs(self) -> "ObsRuns": ...

    @property
    def source(self) -> str: ...

    @property
    def n_cells(self) -> int: ...

    def chunks(self, size: int) -> Iterator[tuple[slice, sp.csr_matrix]]: ...

    def read(self, start: int, stop: int) -> sp.csr_matrix: ...


# a sample of a query is read as this many runs of consecutive cells: a sorted file (by type, by sample) is
# still sampled across its whole length, at a few milliseconds a run where random rows would cost one read each
SAMPLE_RUNS = 100


def sample_cells(source: CellChunks, cells: int, seed: int,
                 transform: Optional[Callable[[sp.csr_matrix], sp.csr_matrix]] = None) -> tuple[np.ndarray, sp.csr_matrix]:
    """(rows, matrix) of at most ``cells`` of the source's cells, in SAMPLE_RUNS runs of consecutive cells at
    seeded random places that do not overlap (every cell of a smaller source), without a pass over it.
    ``transform`` is applied to each run's raw rows as it is read (e.g. normalize and keep a few genes), so the
    sample never holds more of the source than that."""
    n = source.n_cells
    if n <= cells:   # one run: the whole source (none when it is empty)
        width, starts = n, np.zeros(1 if n else 0, dtype=np.int64)
    else:            # the source as consecutive slots of ``width`` cells, of which ``cells // width`` are read
        width = max(1, cells // SAMPLE_RUNS)
        slots = n // width
        starts = np.sort(np.random.default_rng(seed).choice(slots, size=min(slots, cells // width),
                                                            replace=False)) * width
    keep = transform if transform is not None else (lambda block: block)
    blocks = [keep(source.read(int(s), int(s) + width)) for s in starts]
    rows = (starts[:, None] + np.arange(width)).ravel()
    return rows, sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(source.genes)), dtype=np.float32)


@dataclass
class InMemoryChunks:
    cells: CellMatrix

    @property
    def genes(self) -> pd.Index:
        return self.cells.genes

    @property
    def obs(self) -> pd.DataFrame:
        return self.cells.obs

    @property
    def runs(self) -> "ObsRuns":
        return FrameRuns(self.cells.obs)

    @property
    def source(self) -> str:
        return self.cells.source

    @property
    def n_cells(self) -> int:
        return self.cells.n_cells

    def chunks(self, size: int) -> Iterator[tuple[slice, sp.csr_matrix]]:
        for start in range(0, self.n_cells, size):
            rows = slice(start, min(start + size, self.n_cells))
            yield rows, self.cells.X[rows]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        return self.cells.X[start:stop]


def is_anndata_store(path: Path) -> bool:
    """An AnnData on disk whose rows can be read on demand: an .h5ad file or a zarr store."""
    path = Path(path)
    return is_zarr_store(path) or (path.name.lower().endswith(".h5ad") and not path.is_dir())


def open_anndata_store(path: Path, mode: Literal["r", "r+"] = "r") -> Any:
    """The root group of an h5ad file (h5py) or a zarr store: anndata's element readers take either."""
    if is_zarr_store(path):
        import zarr

        # an edit goes to the arrays themselves: consolidated metadata (a read-side index) is rewritten after it
        return zarr.open_group(str(path), mode=mode, use_consolidated=False if mode == "r+" else None)
    import h5py

    return h5py.File(path, mode)


def blockwise_obs_layout(group: Any) -> bool:
    """Whether an obs group is in the layout of anndata >= 0.8 (dataframe 0.2.0: each column a self-describing
    element, the ids a string array), whose ids and columns can be read a run of cells at a time. Anything older
    or unexpected is anndata's to read, whole."""
    attributes = dict(group.attrs) if hasattr(group, "attrs") else {}
    index_key = attributes.get("_index")
    return (attributes.get("encoding-type") == "dataframe" and attributes.get("encoding-version") == "0.2.0"
            and "column-order" in attributes and index_key in group
            and group[index_key].attrs.get("encoding-type") == "string-array")


def read_obs(group: Any) -> pd.DataFrame:
    """The obs of an AnnData store, its cell ids as one Arrow string array (pandas' ``string[pyarrow]``).

    The ids are read a slice at a time: anndata's reader makes a Python string of every id first (~85 B a cell,
    and twice that while the index is converted: 0.5 GB at 5 million cells, the peak of streaming a
    prediction), the Arrow array holds them in ~20 B. The other columns are read as anndata reads them. Stores
    in an older layout are read whole by anndata."""
    import anndata.io

    if not blockwise_obs_layout(group):
        frame = anndata.io.read_elem(group)
        frame.index = pd.Index(pd.array(frame.index.astype(str), dtype="string[pyarrow]"))
        return frame
    stored = group[group.attrs["_index"]]
    parts = [pa.array(_strings(stored, start, min(start + ID_SLICE, stored.shape[0])), type=pa.large_string())
             for start in range(0, stored.shape[0], ID_SLICE)]
    ids = pd.Index(pd.arrays.ArrowStringArray(pa.chunked_array(parts, type=pa.large_string())))
    columns = [str(name) for name in group.attrs.get("column-order", [])]
    return pd.DataFrame({name: anndata.io.read_elem(group[name]) for name in columns}, index=ids, columns=columns)


def _strings(stored: Any, start: int, stop: int) -> np.ndarray:
    """Elements start..stop-1 of a stored string array (h5py or zarr) as Python strings."""
    if hasattr(stored, "asstr"):
        return stored.asstr()[start:stop]
    values = np.asarray(stored[start:stop], dtype=object)
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object) \
        if len(values) and not isinstance(values[0], str) else values


class ObsRuns(Protocol):
    """A dataset's per-cell metadata as prediction reads it: the ids and columns of a run of cells, so that a
    streamed query holds none of it for the whole dataset."""

    @property
    def n_cells(self) -> int: ...

    @property
    def columns(self) -> list[str]: ...

    def ids(self, start: int, stop: int) -> pd.Index: ...

    def column(self, name: str, start: int, stop: int) -> pd.Series: ...

    def id_slices(self) -> Iterator[np.ndarray]:
        """Every id as UTF-8 bytes (one kind from every source, so that ids of shards of either kind hash
        alike), ID_SLICE at a time: what the uniqueness check on opening reads."""
        for start in range(0, self.n_cells, ID_SLICE):
            ids = self.ids(start, min(start + ID_SLICE, self.n_cells))
            yield np.array([str(i).encode() for i in ids], dtype=object)


@dataclass
class FrameRuns(ObsRuns):
    """Runs of an obs DataFrame in memory."""
    frame: pd.DataFrame

    @property
    def n_cells(self) -> int:
        return len(self.frame)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    def ids(self, start: int, stop: int) -> pd.Index:
        return pd.Index(np.asarray(self.frame.index[start:stop], dtype=object))

    def column(self, name: str, start: int, stop: int) -> pd.Series:
        return self.frame[name].iloc[start:stop].reset_index(drop=True)


def obs_runs(group: Any) -> ObsRuns:
    """Runs of an AnnData store's obs: read from the store as they are asked for, or, in an older layout, from
    the whole obs read at once (:func:`read_obs`)."""
    return StoredRuns(group) if blockwise_obs_layout(group) else FrameRuns(read_obs(group))


class StoredRuns(ObsRuns):
    """Runs of the obs of an AnnData store (h5ad or zarr) in today's layout (:func:`blockwise_obs_layout`), read
    from it when asked: ids as strings, categorical and plain columns a slice at a time; a column in another
    encoding (nullable integers, ...) is read whole once."""

    def __init__(self, group: Any):
        import anndata.io

        self.group = group
        self._read: dict[str, Any] = {}   # categories, or whole columns, read once
        # each column's element and its categories now, so that a damaged store fails on opening, not mid-stream
        for name in self.columns:
            element = group[name]
            if element.attrs.get("encoding-type") == "categorical":
                self._read[name] = pd.CategoricalDtype(anndata.io.read_elem(element["categories"]),
                                                       ordered=bool(element.attrs.get("ordered", False)))

    @property
    def n_cells(self) -> int:
        return int(self.group[self.group.attrs["_index"]].shape[0])

    @property
    def columns(self) -> list[str]:
        return [str(name) for name in self.group.attrs["column-order"]]

    def ids(self, start: int, stop: int) -> pd.Index:
        return pd.Index(_strings(self.group[self.group.attrs["_index"]], start, stop), dtype=object)

    def id_slices(self) -> Iterator[np.ndarray]:
        """Every id as UTF-8 bytes, read as stored: h5py reads them undecoded in 3/4 of the time and they hash in
        a quarter of it (the uniqueness check on opening: 2.2 vs 3.2 s at 5 million cells)."""
        stored = self.group[self.group.attrs["_index"]]
        for start in range(0, self.n_cells, ID_SLICE):
            values = np.asarray(stored[start:start + ID_SLICE], dtype=object)
            if len(values) and not isinstance(values[0], bytes):   # zarr gives str
                values = np.array([str(v).encode() for v in values], dtype=object)
            yield values

    def column(self, name: str, start: int, stop: int) -> pd.Series:
        import anndata.io

        element = self.group[name]
        encoding = element.attrs.get("encoding-type")
        if encoding == "categorical":
            codes = np.asarray(element["codes"][start:stop])
            return pd.Series(pd.Categorical.from_codes(codes, dtype=self._read[name]))
        if encoding == "string-array":
            return pd.Series(_strings(element, start, stop), dtype=object)
        if encoding == "array" and len(element.shape) == 1:
            return pd.Series(np.asarray(element[start:stop]))
        if name not in self._read:
            self._read[name] = pd.Series(anndata.io.read_elem(element))
        return self._read[name].iloc[start:stop].reset_index(drop=True)


class ShardRuns(ObsRuns):
    """Runs of several datasets' obs, one after the other (each given with its number of cells); a column some
    shards lack is missing (NaN) in their cells, as pandas joins the frames."""

    def __init__(self, parts: list[tuple[int, ObsRuns]]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [n for n, _ in parts])

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(name for _, runs in self.parts for name in runs.columns))

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[ObsRuns, int, int]]:
        for (n, runs), offset in zip(self.parts, self.offsets):
            low, high = max(start - offset, 0), min(stop - offset, n)
            if low < high:
                yield runs, int(low), int(high)

    def ids(self, start: int, stop: int) -> pd.Index:
        pieces = [np.asarray(runs.ids(low, high), dtype=object) for runs, low, high in self._pieces(start, stop)]
        return pd.Index(np.concatenate(pieces) if pieces else np.zeros(0, dtype=object), dtype=object)

    def id_slices(self) -> Iterator[np.ndarray]:
        for _, runs in self.parts:
            yield from runs.id_slices()

    def column(self, name: str, start: int, stop: int) -> pd.Series:
        pieces = [runs.column(name, low, high) if name in runs.columns else pd.Series(np.full(high - low, np.nan))
                  for runs, low, high in self._pieces(start, stop)]
        return pd.concat(pieces, ignore_index=True) if pieces else pd.Series([], dtype=object)


class CsrRows:
    """Rows of a CSR matrix stored as an AnnData element (its data, indices and indptr arrays, in an h5ad file
    or a zarr store): a run of rows is three contiguous reads. anndata's sparse_dataset reads the same and
    took 40% longer per block of 8,192 cells."""

    def __init__(self, element: Any):
        self.data, self.indices, self.indptr = element["data"], element["indices"], element["indptr"]
        self.shape = tuple(int(n) for n in element.attrs["shape"])

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("CsrRows reads runs of consecutive rows")
        stop = max(stop, start)
        bounds = np.asarray(self.indptr[start:stop + 1], dtype=np.int64)
        if len(bounds) == 0:
            bounds = np.zeros(1, dtype=np.int64)
        low, high = int(bounds[0]), int(bounds[-1])
        return sp.csr_matrix((np.asarray(self.data[low:high]), np.asarray(self.indices[low:high]), bounds - low),
                             shape=(stop - start, self.shape[1]))


class H5adChunks:
    """Stream the rows of an AnnData store's matrix (an .h5ad file or a .zarr store); keep it open while
    iterating."""

    def __init__(self, path: Path, *, layer: Optional[str] = None, gene_column: Optional[str] = None):
        import anndata.io

        self.path, self.source = Path(path), str(path)
        kind = "zarr store" if is_zarr_store(self.path) else "h5ad"
        try:
            self._file = open_anndata_store(self.path, "r")
            # per-cell metadata stays in the store: runs of it are read as blocks stream, the whole frame only
            # when something needs it (tissue groups, covariates, the annotated copy)
            self.runs: ObsRuns = obs_runs(self._file["obs"])
            self._obs: Optional[pd.DataFrame] = None
            var_group = self._file["raw"]["var"] if layer == "raw" else self._file["var"]
            var = anndata.io.read_elem(var_group)
        except Exception as e:
            raise ScnymError(f"could not read {path} as {kind} ({type(e).__name__}: {e}); is it complete?") from None
        self._element = self._matrix_element(layer)
        if gene_column is None:
            self.genes = pd.Index(var.index.astype(str))
        elif gene_column in var.columns:
            self.genes = pd.Index(var[gene_column].astype(str))
        else:
            raise ScnymError(f"gene column {gene_column!r} not in {path} var columns {list(var.columns)}")
        require_unique_id_slices(self.runs.id_slices, self.runs.n_cells, str(path))
        self.n_cells = self.runs.n_cells
        encoding = self._element.attrs.get("encoding-type", "array") if hasattr(self._element, "attrs") else "array"
        self._whole: Optional[sp.csr_matrix] = None
        self._rows: Any = None  # a dense h5py / zarr array or CsrRows: rows read on demand
        if encoding == "csc_matrix":
            self._whole = as_csr32(anndata.io.read_elem(self._element))
            self._rows = None
        elif encoding == "csr_matrix":
            self._rows = CsrRows(self._element)
        else:
            self._rows = self._element
        shape = self._whole.shape if self._whole is not None else self._rows.shape
        if shape != (self.n_cells, len(self.genes)):
            raise ScnymError(f"{path}: matrix {shape} does not match {self.n_cells} cells x {len(self.genes)} genes")

    @property
    def obs(self) -> pd.DataFrame:
        """The whole obs, read on first use (its ids as Arrow strings: :func:`read_obs`)."""
        if self._obs is None:
            self._obs = self.runs.frame if isinstance(self.runs, FrameRuns) else read_obs(self._file["obs"])
        return self._obs

    @obs.setter
    def obs(self, frame: pd.DataFrame) -> None:   # e.g. joined with --training_metadata
        self._obs, self.runs = frame, FrameRuns(frame)

    def _matrix_element(self, layer: Optional[str]):
        f = self._file
        if layer is None:
            if "X" not in f:
                raise ScnymError(f"{self.path} has no expression matrix in X; choose one with --input_layer")
            return f["X"]
        if layer == "raw":
            if "raw" not in f:
                raise ScnymError(f"{self.path} has no .raw; choose another --input_layer")
            return f["raw"]["X"]
        layers = list(f["layers"].keys()) if "layers" in f else []
        if layer not in layers:
            raise ScnymError(f"layer {layer!r} not in {self.path}; available: {sorted(layers) or 'none'}")
        return f["layers"][layer]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw rows start..stop-1 as float32 CSR."""
        rows = slice(start, stop)
        return as_csr32(self._whole[rows] if self._whole is not None else self._rows[rows])

    def chunks(self, size: int) -> Iterator[tuple[slice, sp.csr_matrix]]:
        for start in range(0, self.n_cells, size):
            stop = min(start + size, self.n_cells)
            yield slice(start, stop), self.read(start, stop)

    def close(self) -> None:
        close = getattr(self._file, "close", None)   # h5py files; a zarr group holds no handle
        if close is not None:
            close()

    def __enter__(self) -> "H5adChunks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def h5ad_files(path: Path) -> list[Path]:
    """The AnnData store itself (.h5ad file or .zarr store), or the stores of a directory of shards in name
    order."""
    path = Path(path)
    if is_anndata_store(path):
        return [path]
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if is_anndata_store(p))
        if not shards:
            raise ScnymError(f"{path} holds no .h5ad or .zarr shards")
        return shards
    raise ScnymError(f"reading from disk needs an .h5ad file, a .zarr store or a folder of them, not {path.name}")


class ShardedH5adChunks:
    """Several h5ad files with the same genes, streamed one after the other as one dataset."""

    def __init__(self, directory: Path, *, layer: Optional[str] = None, gene_column: Optional[str] = None):
        self.parts = [H5adChunks(p, layer=layer, gene_column=gene_column) for p in h5ad_files(directory)]
        self.source, self.path = str(directory), Path(directory)
        self.genes = self.parts[0].genes
        for part in self.parts[1:]:
            if not part.genes.equals(self.genes):
                raise ScnymError(f"shard {part.source} has other genes than {self.parts[0].source}; all shards of "
                                 f"{directory} must have the same genes in the same order")
        self.runs: ObsRuns = ShardRuns([(part.n_cells, part.runs) for part in self.parts])
        self._obs: Optional[pd.DataFrame] = None
        require_unique_id_slices(self.runs.id_slices, self.n_cells, self.source)

    @property
    def obs(self) -> pd.DataFrame:
        """The shards' obs as one frame, read on first use."""
        if self._obs is None:
            self._obs = pd.concat([part.obs for part in self.parts], axis=0, join="outer")
        return self._obs

    @obs.setter
    def obs(self, frame: pd.DataFrame) -> None:
        self._obs, self.runs = frame, FrameRuns(frame)

    @property
    def n_cells(self) -> int:
        return sum(part.n_cells for part in self.parts)

    def chunks(self, size: int) -> Iterator[tuple[slice, sp.csr_matrix]]:
        offset = 0
        for part in self.parts:
            for rows, block in part.chunks(size):
                yield slice(offset + rows.start, offset + rows.stop), block
            offset += part.n_cells

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw rows start..stop-1 of the shards as one dataset (a run may span shards)."""
        blocks, offset = [], 0
        for part in self.parts:
            low, high = max(start - offset, 0), min(stop - offset, part.n_cells)
            if low < high:
                blocks.append(part.read(low, high))
            offset += part.n_cells
        return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.genes)), dtype=np.float32)

    def close(self) -> None:
        for part in self.parts:
            part.close()
