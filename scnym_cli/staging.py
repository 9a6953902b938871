"""Atomic outputs: everything is written into a hidden staging directory beside ``out_path``
and moved into place only when the whole job succeeded. A job that fails leaves nothing
behind that looks like a result."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ScnymError

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged_directory(out_path: Path, *, overwrite: bool, protected: Sequence[str],
                     last: Sequence[str] = (), writes: bool = True, owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging directory; on success move its entries into ``out_path``.

    Parameters
    ----------
    protected
        Entries whose presence in ``out_path`` means a finished result is there: refused
        (before any work starts) unless ``overwrite``.
    last
        Entries moved after all others (completion markers).
    owned
        Glob patterns of every entry the command writes: when it replaces an earlier result, those of the
        earlier result it did not write again go (a fold folder of a run with more folds, an old logits.csv),
        so that out_path never mixes two runs. Other entries are never touched.
    writes
        False in the processes of a data-parallel run other than the first (workflows/runtime.py): they
        compute, only the first writes; theirs is a scratch directory, deleted afterwards.
    """
    if not writes:
        # data-parallel runs: every rank computes, only rank 0 writes outputs
        with tempfile.TemporaryDirectory(prefix="scnym-rank-") as scratch:
            yield Path(scratch)
        return
    out_path = Path(out_path).expanduser().resolve()
    if out_path.exists() and not out_path.is_dir():
        raise ScnymError(f"--out_path {out_path} is a file; give a directory")
    blocking = next((parent for parent in out_path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ScnymError(f"--out_path {out_path} cannot be created: {blocking} is a file, not a folder; "
                         "choose another --out_path")
    existing = [name for name in protected if (out_path / name).exists()]
    if existing and not overwrite:
        raise ScnymError(f"--out_path {out_path} already holds results ({', '.join(existing)}); "
                         "choose another --out_path or pass --overwrite true")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    unfinished = sorted(out_path.parent.glob(f".{out_path.name}.partial-*"))
    if unfinished:
        # never removed here: a fold job of the same run may be writing one right now
        log.warning("%d unfinished output folder(s) of %s from runs that stopped before the end (killed, out of "
                    "time) lie beside it: %s; they are never used, delete them when no job of this run is running",
                    len(unfinished), out_path.name, ", ".join(p.name for p in unfinished[:3]))
    stage = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        yield stage
        out_path.mkdir(parents=True, exist_ok=True)
        entries = sorted(stage.iterdir(), key=lambda p: (p.name in last, p.name))
        written = {entry.name for entry in entries}
        if existing:  # an earlier result is replaced: none of its own entries may stay beside the new one
            for pattern in owned:
                for stale in out_path.glob(pattern):
                    if stale.name not in written:
                        _remove(stale)
        for entry in entries:
            target = out_path / entry.name
            _remove(target)
            os.replace(entry, target)
        log.info("outputs written to %s", out_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
