"""Portable CPU numerics (stages/numerics.py): the same bytes on every x86-64 CPU with AVX2.

The golden run's sha256 is pinned. The CPU under these tests changes from one session to the
next: if the pin ever fails on a new CPU, that is a finding about the numerics, not a pin to
update. The second pin is the committed dvc.lock (tests/test_pipeline_e2e.py).
"""

from __future__ import annotations

import json
import platform
import sys

import pytest

from .helpers.tools import REPO, run, tool_env

# SGD steps of the tutorial's network or a small CNN, seeded, on synthetic batches; prints the
# weights' sha256. Arguments: threads, mlp|cnn, steps.
GOLDEN_RUN = """
import hashlib, io, sys
import stages  # pins the numerics before torch loads, as every stage process does
import torch
from torch import nn
from stages.model import NeuralNetwork
from stages import numerics
from stages.config import TrainParams
from stages.model import build_model
torch.set_num_threads(int(sys.argv[1]))
numerics.configure_torch()
torch.manual_seed(0)
model = NeuralNetwork() if sys.argv[2] == "mlp" else build_model(
    TrainParams(model="cnn", conv_channels=[8, 16], hidden_sizes=[32])
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
data = torch.Generator().manual_seed(1)
loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
for _ in range(int(sys.argv[3])):
    x = torch.rand(64, 1, 28, 28, generator=data)
    y = torch.randint(0, 10, (64,), generator=data)
    loss_fn(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
print(hashlib.sha256(buffer.getvalue()).hexdigest())
"""
# Pinned on 2026-11-30 on an Intel Xeon (family 6 model 167, AVX-512, AMX-BF16), torch 2.14.1.
GOLDEN_SHA256 = {
    "mlp": "46388d799a9d4b52cce05027745f7b98a6aec6fb877cb0dc766932b8a1436024",
    "cnn": "3c1403872eaf59f84704a32bdff21ab5efca46a4d0c49007e37812de8d79bc0d",
}
STEPS = {"mlp": 300, "cnn": 40}

x86_64 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the guarantee covers x86-64"
)


def golden(threads: int, model: str, **env: str) -> str:
    command = [sys.executable, "-c", GOLDEN_RUN, str(threads), model, str(STEPS[model])]
    return run(command, REPO, tool_env(**env)).stdout.strip()


def described(**env: str) -> dict:
    code = (
        "import json, stages; stages.numerics.configure_torch(); "
        "print(json.dumps(stages.numerics.describe()))"
    )
    return json.loads(run([sys.executable, "-c", code], REPO, tool_env(**env)).stdout)


@x86_64
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_golden_run_gives_the_pinned_bytes_at_any_thread_count(model: str) -> None:
    if not described()["portable"]:
        pytest.skip("this CPU has no AVX2: the guarantee does not cover it")
    assert golden(1, model) == GOLDEN_SHA256[model]
    assert golden(2, model) == GOLDEN_SHA256[model]  # STRICT MKL, no oneDNN: threads change nothing


@x86_64
def test_portable_numerics_are_on_by_default_and_can_be_switched_off() -> None:
    on = described()
    assert on["aten_cpu_capability"] == "avx2" and on["mkl_cbwr"] == "AVX2,STRICT"
    assert on["onednn"] is False
    off = described(FMNIST_PORTABLE_NUMERICS="0")
    assert off["portable"] is False and off["aten_cpu_capability"] == "" and off["onednn"]
    assert "why_not" not in off  # switched off, not unavailable
