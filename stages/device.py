"""The one place that turns `device: auto|cpu|cuda|cuda:N|mps` into a torch.device."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

from stages.errors import StageError

# The default for callers without a stage logger; stages pass theirs, so a flow run's UI shows it.
LOG = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter


class DeviceError(StageError):
    """The requested device does not exist on this machine."""


def resolve_device(spec: str, log: Logger = LOG) -> torch.device:
    """auto picks CUDA, then MPS, then CPU; an explicit request that cannot be met is an error."""
    mps_available = torch.backends.mps.is_available()
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif mps_available:
            spec = "mps"
        else:
            spec = "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device = {spec!r}: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device: auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device = {spec!r}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not mps_available:
        raise DeviceError(f"device = {spec!r}: MPS is not available on this machine")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    log.info("device: %s (%s)", device, name)
    return device


def configure_threads(num_threads: int, log: Logger = LOG) -> int:
    """Sets torch's intra-op threads; 0 means one per physical core (hyperthreads slow GEMMs)."""
    if num_threads == 0:
        import psutil

        num_threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(num_threads)
    log.info("torch threads: %d", num_threads)
    return num_threads


def configure_determinism(deterministic: bool, log: Logger = LOG) -> None:
    """`train.deterministic`: deterministic CUDA kernels, at some cost in speed on the GPU.

    The CPU path is deterministic without it. cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it
    creates its handle, so this must run before the first CUDA matmul.
    """
    # Set both ways: the flow runs several stages in one process.
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        log.info("deterministic algorithms on")


# /proc/cpuinfo flags of CPUs that run bfloat16 matmuls natively, fastest first.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in /proc/cpuinfo; None where there is no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def native_bf16(device: torch.device) -> str | None:
    """What runs bfloat16 natively on `device` (a CPU flag, or the GPU); None if nothing does."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    found = [flag for flag in BF16_FLAGS if flag in cpu_flags()]
    return found[0] if found else None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, as lscpu shows it), else what platform knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()
