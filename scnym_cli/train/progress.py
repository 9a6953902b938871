"""What a running training shows: a progress bar where someone watches (a terminal, a notebook), one line
every few epochs where nobody does (SLURM logs, CI, files), and the per-epoch CSV log."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Optional, TextIO

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("scnym_cli.train")

# a progress line in non-interactive output at least every this many seconds, and about 10 per model
PROGRESS_LINE_SECONDS = 30.0
PROGRESS_LINES_PER_MODEL = 10


class EpochProgress:
    """Per-epoch progress of one model: rich's bar when the output is watched live, else an INFO log line
    ("fold02: epoch 30/100, loss 0.412, selection accuracy 0.931, best epoch 28, 41 s") every tenth of the
    epochs or every PROGRESS_LINE_SECONDS, whichever comes first, and one for the last epoch."""

    def __init__(self, name: str, n_epochs: int, enabled: bool, done: int = 0):
        console = Console(stderr=True)
        self.name, self.n_epochs, self.done = name, n_epochs, done   # done: epochs of a resumed fit
        self.live = enabled and (console.is_terminal or console.is_jupyter)
        self.lines = enabled and not self.live
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=console, transient=True, disable=not self.live)
        self._every = max(1, n_epochs // PROGRESS_LINES_PER_MODEL)
        self._started = self._last_line = time.perf_counter()

    def __enter__(self) -> "EpochProgress":
        self._bar.__enter__()
        self._task = self._bar.add_task(self.name, total=self.n_epochs, completed=self.done, status="")
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update(self, epoch: int, loss: float, select_accuracy: float, best_epoch: int) -> None:
        status = f"loss {loss:.3f} select acc {select_accuracy:.3f} best epoch {best_epoch}"
        self._bar.update(self._task, advance=1, status=status)
        now = time.perf_counter()
        if self.lines and (epoch % self._every == 0 or epoch == self.n_epochs
                           or now - self._last_line >= PROGRESS_LINE_SECONDS):
            self._last_line = now
            log.info("%s: epoch %d/%d, loss %.3f, selection accuracy %.3f, best epoch %d, %.0f s", self.name,
                     epoch, self.n_epochs, loss, select_accuracy, best_epoch, now - self._started)


class EpochLog:
    """One CSV row per epoch, flushed as it is written so a running job can be watched."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.rows: list[dict] = []
        self._writer: Optional[csv.DictWriter] = None
        self._handle: Optional[TextIO] = None

    def restore(self, rows: list[dict]) -> None:
        """The rows of a resumed fit's earlier epochs: the file is written again from them."""
        self.rows = []
        for row in rows:
            self.write(dict(row))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        if self._writer is None or self._handle is None:
            self._handle = open(self.path, "w", newline="")
            self._writer = csv.DictWriter(self._handle, fieldnames=list(row))
            self._writer.writeheader()
        self._writer.writerow(row)
        self._handle.flush()

    def close(self) -> pd.DataFrame:
        if self._handle is not None:
            self._handle.close()
        return pd.DataFrame(self.rows)
