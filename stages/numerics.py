"""Portable CPU numerics: the same weights, byte for byte, on every x86-64 CPU with AVX2.

PyTorch picks its vectorised CPU kernels by the CPU's capability (AVX2, AVX-512), and MKL its
GEMM code path by CPU model, so the same seeded training gives other bytes on another CPU. Both
read a setting when they load, which `pin()` makes before anything imports torch (it runs when
the `stages` package is imported, in every stage process and in the flow's):
- ATEN_CPU_CAPABILITY=avx2: PyTorch's kernels at the AVX2 level;
- MKL_CBWR=AVX2,STRICT: MKL's conditional numerical reproducibility at the same level; STRICT
  also makes its results independent of the thread count (measured: docs/results.md).
Once torch is loaded, `configure_torch()` (called with the device choice) also turns oneDNN off:
it runs the CNN's convolutions with kernels picked by CPU and sums split by thread count, so
they take ATen's path instead, through MKL as pinned above. The MLP never uses oneDNN.

FMNIST_PORTABLE_NUMERICS=0 turns it off for speed. Either way the train stage logs it and records
it (train's record, the model card, the checkpoint fingerprint). Out of scope, and logged as such:
CUDA, CPUs without AVX2, and other architectures (Apple silicon).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

SWITCH = "FMNIST_PORTABLE_NUMERICS"
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
LEVEL = "AVX2"


def wanted() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def pin() -> None:
    """Sets PORTABLE in the environment, unless switched off, on x86-64, before torch loads."""
    if not wanted():
        for name, value in PORTABLE.items():  # a parent process's pin, inherited
            if os.environ.get(name) == value:
                del os.environ[name]
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    if "torch" in sys.modules:  # too late to take effect: describe() will say so
        return
    os.environ.update(PORTABLE)


BF16_REASON = (
    "train.precision bf16: its matmuls need oneDNN's bf16 kernels, picked by CPU, so the same "
    "bytes hold on this CPU model only"
)
_bf16 = False


def configure_torch(bf16: bool = False) -> None:
    """oneDNN off while portable numerics are in effect (on, as torch has it, otherwise). bf16
    training keeps it on: without oneDNN, torch runs bf16 matmuls on the CPU slowly."""
    import torch

    global _bf16
    _bf16 = bf16
    torch.backends.mkldnn.enabled = bf16 or not _pinned(torch)


def _pinned(torch: Any) -> bool:
    settings = {name: os.environ.get(name, "") for name in PORTABLE}
    return settings == PORTABLE and torch.backends.cpu.get_cpu_capability() == LEVEL


def describe() -> dict[str, str | bool]:
    """What is in effect, for logs and records: {"portable": …, "cpu_capability": …, ...}."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    portable = _pinned(torch) and not torch.backends.mkldnn.enabled
    described: dict[str, str | bool] = {"portable": portable, "cpu_capability": capability}
    described.update({name.lower(): os.environ.get(name, "") for name in PORTABLE})
    described["onednn"] = torch.backends.mkldnn.enabled
    if wanted() and not portable and _bf16 and _pinned(torch):
        described["why_not"] = BF16_REASON
    elif wanted() and not portable:
        described["why_not"] = (
            f"not available here ({platform.machine()}, torch CPU capability {capability}): the "
            "same-bytes guarantee covers x86-64 CPUs with AVX2"
        )
    return described
