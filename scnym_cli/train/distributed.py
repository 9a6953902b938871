"""Data-parallel training with torch.distributed, as launched by ``torchrun``.

Every process (rank) loads the data and builds the same splits; each global batch is drawn the same
way as in one process and split between the ranks, so class balancing and seeds are kept; gradients
are averaged by DistributedDataParallel; batch-norm statistics are taken from rank 0 before every
evaluation, so early stopping is decided identically everywhere (and broadcast from rank 0 to be
sure). Only rank 0 writes outputs. CPU runs use the gloo backend, GPU runs NCCL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place in the distributed run (world size 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    return Ranks()


def initialize(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment; each rank gets its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ranks = current()
    log.info("distributed training: rank %d of %d on %s (%s backend)", ranks.rank, ranks.world_size, device,
             dist.get_backend())
    return ranks, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sync_buffers(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (batch-norm running statistics)."""
    if current().active:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _collective_device() -> torch.device:
    """NCCL exchanges GPU tensors, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    if not current().active:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def parameters_identical(module: torch.nn.Module) -> bool:
    """Whether every rank holds exactly the same parameters (float64 checksum of each tensor)."""
    if not current().active:
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(_collective_device())
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)
