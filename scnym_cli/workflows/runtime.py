"""Where a command runs, set up once per command: the device, torch's CPU threads, and (under torchrun) the
process group. The CLI owns its process; the Python API gives the thread count back after each call
(api.py)."""

from __future__ import annotations

import logging

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


def writes_outputs() -> bool:
    """Whether this process writes the outputs: always, except in the non-first processes of a torchrun run."""
    return distributed.current().is_main


def teardown_runtime() -> None:
    """Leave a torchrun process group, if one was joined."""
    distributed.shutdown()
