"""Where a command runs, set up once per command: the device, torch's CPU threads, and (under torchrun) the
process group. The CLI owns its process; the Python API gives the thread count back after each call
(api.py)."""

from __future__ import annotations

import logging
import os

import torch

from ..config import Config
from ..train import distributed
from ..train.device import default_threads, resolve_device

log = logging.getLogger(__name__)


def setup_runtime(config: Config) -> torch.device:
    """Resolve the device and the CPU thread count; join a torchrun process group."""
    torch.set_num_threads(config.num_threads or default_threads())
    ranks, device = distributed.initialize(resolve_device(config.device))
    log.info("device: %s (%d CPU threads)%s", device, torch.get_num_threads(),
             f", rank {ranks.rank} of {ranks.world_size}" if ranks.active else "")
    return device


def resuming(config: Config) -> bool:
    """--resume, or a job SLURM started again (requeued after preemption, a node failure or a time-limit
    warning): such a job continues what its first start left, as long as settings and data are the same."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if not config.resume and restarts.isdigit() and int(restarts) > 0:
        log.info("SLURM restarted this job (restart %s): continuing its unfinished run, if any", restarts)
        return True
    return config.resume


def writes_outputs() -> bool:
    """Whether this process writes the outputs: always, except in the non-first processes of a torchrun run."""
    return distributed.current().is_main


def teardown_runtime() -> None:
    """Leave a torchrun process group, if one was joined."""
    distributed.shutdown()
