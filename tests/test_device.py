import os

import pytest
import torch

from stages.device import DeviceError, configure_threads, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def test_cpu_is_always_available() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_then_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error_not_a_fallback(spec: str) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device(spec)


@needs_cuda
def test_tensors_move_to_the_gpu() -> None:
    device = resolve_device("cuda")
    assert torch.ones(2, device="cpu").to(device).device.type == "cuda"
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_zero_threads_means_physical_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(0) >= 1
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_deterministic_mode_turns_on_deterministic_algorithms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stages.device import configure_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
