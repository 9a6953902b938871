"""Training checkpoints: everything a fit needs to go on from the end of an epoch exactly as if it had never
stopped, written atomically.

A checkpoint holds the model and objective (domain head, mean teacher, distribution-alignment and FlexMatch
buffers), the optimizer, the learning-rate schedule, the loss scaler, torch's RNG of every device, the samplers'
generators and the rest of the target stream's pass, the census of target pseudolabels, the best epoch so far
with its weights, and the epoch log. On CPU, a fit resumed from it gives bit-identical weights (same thread
count; tests/test_resume.py kills runs with SIGKILL at several points, one of them inside a checkpoint write).

The file is written to a temporary name and renamed over the previous checkpoint: a kill at any moment leaves
either the previous complete checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

# Tests (tests/test_resume.py) set this to make the process kill itself with SIGKILL at a named point of a run,
# e.g. "checkpoint_write:all_data:2" (halfway through writing all_data's checkpoint of epoch 2),
# "epoch_end:fold01:3" (fold01's epoch 3 finished, before its checkpoint), "model_done:fold00"
# (fold00 complete, nothing else started), "run_done" (every model trained, before the run's tables).
KILL_VARIABLE = "SCNYM_TEST_KILL_AT"


def _kill_wanted(*where: object) -> bool:
    return os.environ.get(KILL_VARIABLE) == ":".join(str(w) for w in where)


def kill_point(*where: object) -> None:
    """SIGKILL this process here if the test hook names this point (a no-op otherwise)."""
    if _kill_wanted(*where):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where one model's checkpoint lives and how often it is written: every ``every_epochs`` epochs or once
    ``every_seconds`` have passed since the last one, whichever comes first (0 turns either rule off)."""

    path: Path
    every_epochs: int = 10
    every_seconds: float = 300.0

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.every_seconds > 0

    def due(self, epoch: int, since_last: float) -> bool:
        return ((self.every_epochs > 0 and epoch % self.every_epochs == 0)
                or (self.every_seconds > 0 and since_last >= self.every_seconds))


def _to_tensors(value: Any) -> Any:
    """numpy arrays as tensors, recursively: the file then loads with torch's weights-only unpickler."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tensors(v) for v in value]
    return value


def save_checkpoint(policy: CheckpointPolicy, state: dict[str, Any], name: str) -> None:
    """Write ``state`` (see :mod:`.trainer`) atomically over the previous checkpoint."""
    policy.path.parent.mkdir(parents=True, exist_ok=True)
    temporary = policy.path.with_name(policy.path.name + ".tmp")
    payload = _to_tensors({"format": CHECKPOINT_FORMAT, **state})
    started = time.perf_counter()
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        if _kill_wanted("checkpoint_write", name, state["epoch"]):
            # the test hook's point "inside a write": half of the bytes on disk, the rest never
            os.ftruncate(handle.fileno(), os.fstat(handle.fileno()).st_size // 2)
            kill_point("checkpoint_write", name, state["epoch"])
        os.fsync(handle.fileno())
    os.replace(temporary, policy.path)
    log.debug("%s: checkpoint of epoch %d written in %.2f s", name, state["epoch"], time.perf_counter() - started)


def load_checkpoint(policy: CheckpointPolicy, name: str) -> Optional[dict[str, Any]]:
    """The last complete checkpoint, or None when there is none. A torn temporary file from a kill during a
    write is ignored (the checkpoint before it is still whole)."""
    if not policy.path.is_file():
        return None
    try:
        state = torch.load(policy.path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- any unreadable file: say which and start over
        log.warning("%s: the checkpoint %s cannot be read (%s); this model starts from its first epoch", name,
                    policy.path, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s: the checkpoint %s is of another scnym version; this model starts from its first epoch",
                    name, policy.path)
        return None
    return state


def remove_checkpoint(policy: CheckpointPolicy) -> None:
    for path in (policy.path, policy.path.with_name(policy.path.name + ".tmp")):
        path.unlink(missing_ok=True)


def torch_rng_state() -> dict[str, Any]:
    """torch's generators: the CPU one and every CUDA device's."""
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_torch_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    for device, device_state in enumerate(state["cuda"]):
        if device < torch.cuda.device_count():
            torch.cuda.set_rng_state(device_state, device)


class StopRequest:
    """SIGUSR1 / SIGTERM asked the run to stop (a batch system's warning before its time limit): the trainer
    finishes its epoch, writes a checkpoint and stops; the run is then continued with --resume."""

    signal_name: Optional[str] = None
    # the request made during the last block, kept after it: code that runs commands in its own process (a
    # benchmark, a notebook) learns that it was asked to stop even when the run ended before it could stop
    last_request: Optional[str] = None

    @classmethod
    def _handler(cls, signum: int, _frame: Any) -> None:
        cls.signal_name = signal.Signals(signum).name   # only a flag: nothing that could block in a handler


STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGUSR1 and SIGTERM request a clean stop (:class:`StopRequest`) instead of ending the
    process at once; the handlers found are put back after it. Outside the main thread it does nothing
    (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            found[number] = signal.signal(number, StopRequest._handler)
    StopRequest.signal_name = StopRequest.last_request = None
    try:
        yield
        if StopRequest.signal_name:   # asked after the last epoch: nothing was left to stop
            log.warning("%s came after training had ended: the run finishes its outputs", StopRequest.signal_name)
    finally:
        for number, handler in found.items():
            signal.signal(number, handler)
        StopRequest.last_request, StopRequest.signal_name = StopRequest.signal_name, None
