"""Atomic outputs: everything is written into a hidden staging directory beside ``out_path``
(``.<out>.partial-<label>``) and moved into place only when the whole job succeeded. A job that fails leaves
nothing behind that looks like a result.

A training run's staging directory is also where a killed run is continued from (--resume): it keeps the
finished models and the training checkpoints. Entries whose names start with ``.scnym-`` are the staging
directory's own bookkeeping (owner, checkpoints, the run's identity) and are never moved into ``out_path``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import RunInterrupted, ScnymError

log = logging.getLogger(__name__)

INTERNAL_PREFIX = ".scnym-"
CHECKPOINT_DIR = INTERNAL_PREFIX + "checkpoints"   # one file per model being trained
OWNER_FILE = INTERNAL_PREFIX + "owner.json"        # the host and process writing the staging directory
FINISHED_MODEL_FILE = "model.json"                 # a model directory is moved in whole: its manifest = done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def partial_directory(out_path: Path, label: str) -> Path:
    """Where a job (``label``: the command, or a fold job's models) stages its outputs for ``out_path``."""
    out_path = Path(out_path).expanduser().resolve()
    return out_path.parent / f".{out_path.name}.partial-{label}"


def resumable_work(stage: Path) -> str:
    """The finished models and training checkpoints in a staging directory (work a resumed run keeps), in
    words; empty when there are none."""
    checkpoints = sum(1 for _ in stage.rglob(f"{CHECKPOINT_DIR}/*.pt"))
    models = sum(1 for path in stage.rglob(FINISHED_MODEL_FILE) if not path.parent.name.startswith(INTERNAL_PREFIX))
    parts = [f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((models, "finished model"),
                                                                   (checkpoints, "checkpoint")) if n]
    return ", ".join(parts)


def _live_owner(stage: Path) -> Optional[int]:
    """The process id of a still-running job on this machine that owns ``stage``, else None."""
    try:
        owner = json.loads((stage / OWNER_FILE).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner.get("host") != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:   # alive, another user's
        return pid
    return pid


def _prepare_stage(stage: Path, *, overwrite: bool, resume: Optional[bool]) -> None:
    """Find an earlier job's staging directory for the same outputs and decide: continue it (--resume),
    delete it (--overwrite, or nothing worth keeping in it), or stop and say what to do."""
    if stage.exists():
        pid = _live_owner(stage)
        if pid is not None:
            raise ScnymError(f"another scnym job (process {pid}) is writing these outputs right now ({stage}); "
                             "wait for it to finish or choose another --out_path")
        work = resumable_work(stage)
        if resume and work:
            log.info("continuing the unfinished run in %s (%s)", stage, work)
        elif resume is None or overwrite or not work:
            log.warning("removed %s: the unfinished outputs of an earlier job that stopped before the end", stage)
            _remove(stage)
        else:
            raise ScnymError(f"{stage} holds an unfinished run of these outputs ({work}; it stopped before the "
                             "end: killed, out of time, or an error): pass --resume true to continue it, or "
                             "--overwrite true to delete it and start over")
    elif resume:
        log.info("no unfinished run to continue in %s: starting from the beginning", stage)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


@contextmanager
def staged_directory(out_path: Path, *, overwrite: bool, protected: Sequence[str],
                     last: Sequence[str] = (), writes: bool = True, owned: Sequence[str] = (), label: str,
                     resume: Optional[bool] = None) -> Iterator[Path]:
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
    label
        Names the staging directory (``.<out>.partial-<label>``): the command, or a fold job's models, so
        that concurrent fold jobs of one run never share one and a rerun finds its own.
    resume
        None for commands with nothing to continue (an earlier job's staging directory is deleted). For
        training: True continues the earlier job's finished models and checkpoints; False refuses to touch
        them unless ``overwrite``. A training job that fails keeps its staging directory when it holds such
        work, so that it can be continued.
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
    # files of the user's own under names this command writes (a confusion_matrix.csv of another tool...)
    clashing = sorted({p.name for pattern in owned for p in out_path.glob(pattern)}) if out_path.is_dir() else []
    if clashing and not overwrite:
        raise ScnymError(f"--out_path {out_path} already holds files this command writes ({', '.join(clashing[:5])}); "
                         "choose another --out_path, or pass --overwrite true to replace them")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stage = partial_directory(out_path, label)
    unfinished = sorted(p for p in out_path.parent.glob(f".{out_path.name}.partial-*") if p != stage)
    if unfinished:
        # never removed here: a fold job of the same run may be writing one right now
        log.warning("%d unfinished output folder(s) of other jobs writing %s lie beside it (running now, or "
                    "stopped before the end): %s; delete them when no job of this run is running",
                    len(unfinished), out_path.name, ", ".join(p.name for p in unfinished[:3]))
    _prepare_stage(stage, overwrite=overwrite, resume=resume)
    keep = False
    try:
        yield stage
        out_path.mkdir(parents=True, exist_ok=True)
        entries = sorted((p for p in stage.iterdir() if not p.name.startswith(INTERNAL_PREFIX)),
                         key=lambda p: (p.name in last, p.name))
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
    except BaseException as error:
        # a training job that stopped (a signal, Ctrl-C, an error) keeps the work it can be continued from
        keep = resume is not None and bool(resumable_work(stage))
        if keep:
            how = "stopped" if isinstance(error, (RunInterrupted, KeyboardInterrupt)) else "failed"
            log.warning("the run %s; its finished models and checkpoints are kept in %s: continue it with "
                        "--resume true", how, stage)
        raise
    finally:
        if not keep:
            shutil.rmtree(stage, ignore_errors=True)
