"""Devices and precision, resolved in one place."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch

from ..errors import ScnymError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ScnymError(f"--device {spec} was requested but no CUDA GPU is available; use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ScnymError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device(spec)
    if spec == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ScnymError("--device mps was requested but MPS is not available; use --device cpu or auto")
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise ScnymError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX), from /proc/cpuinfo's
    flags; False where that is not known (not Linux). Elsewhere bfloat16 is emulated, and slower than float32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The number format of prediction's matrix products (--inference_precision): ``float32``, ``bfloat16``, or
    ``auto``: bfloat16 on CUDA (float16 where a GPU lacks bfloat16, as training uses) and on CPUs with bfloat16
    instructions, float32 elsewhere."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if choice != "auto":
        raise ValueError(f"inference precision {choice!r} is not auto, float32 or bfloat16")
    if device.type == "cuda":
        return Precision(device).dtype
    if device.type == "cpu" and native_bfloat16_cpu():
        return torch.bfloat16
    return torch.float32


def inference_autocast(device: torch.device, dtype: torch.dtype):
    """A block whose matrix products run in ``dtype`` (nothing changes for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def flushing_denormals() -> bool:
    """Whether the CPU flushes subnormal floats to zero now. torch has a setter but no getter: a
    subnormal float32 multiplied by one comes out zero exactly when flushing is on."""
    return bool((torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0)


class flush_denormals(contextlib.ContextDecorator):
    """Flush subnormal floats to zero on the CPU while scnym computes, then put back what was found.

    Confident softmax outputs underflow to subnormal numbers (~1e-40) whose gradients then flow
    through every backward matrix product; CPUs process subnormals many times slower (measured:
    15x for a forward/backward pass of a trained model). Nothing scnym computes depends on values
    that small. Blocks nest (evaluation inside training): only the outermost one sets the flag, and on
    leaving it restores the caller's setting, whatever it was. The flag is the CPU's, held per thread (the
    floating-point control register): each thread counts its own blocks (prediction runs blocks on two).
    """

    _state = threading.local()   # per thread: open blocks, and the setting the outermost one found

    def __enter__(self):
        state = flush_denormals._state
        if getattr(state, "depth", 0) == 0:
            state.found = flushing_denormals()
            state.depth = 0
            torch.set_flush_denormal(True)
        state.depth += 1
        return self

    def __exit__(self, *exc):
        state = flush_denormals._state
        state.depth -= 1
        if state.depth == 0:
            torch.set_flush_denormal(state.found)
        return False


@contextlib.contextmanager
def seeded_rng(seed: int):
    """torch's global RNGs seeded with ``seed`` inside the block, and the caller's states back after it: the
    CPU generator and that of every CUDA device (``torch.manual_seed`` seeds them all, so all are saved)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def thread_count_restored():
    """torch's intra-op thread count put back on leaving the block, whatever the block set it to (the
    command workflows set it for their run: a notebook calling them keeps its own)."""
    found = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != found:
            torch.set_num_threads(found)


# torch's intra-op threads beyond which this model's steps get no faster (see default_threads)
USEFUL_THREADS = 2


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, cgroups, SLURM's binding), capped by
    SLURM_CPUS_PER_TASK when set (SLURM does not always bind)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return max(count, 1)


def default_threads() -> int:
    """Threads for torch when --num_threads is not given: the CPUs this process may use, at most
    USEFUL_THREADS (more do not speed up steps of a 256-wide MLP, and oversubscribe shared machines)."""
    return min(available_cpus(), USEFUL_THREADS)


@dataclass
class Precision:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling)."""

    device: torch.device

    def __post_init__(self) -> None:
        self.enabled = self.device.type == "cuda"
        self.dtype = (torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)
