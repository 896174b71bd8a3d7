"""Shared fixtures: tiny synthetic IDX files for unit tests, the real data for end-to-end tests."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.config import Params, parse_params

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Tests (never product code) know where this workplace keeps a copy of the official files.
SHARED_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
RAW_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "ORT_DISABLE_TELEMETRY": "1",
}


def idx_bytes(array: torch.Tensor, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008NN, big-endian dims, then the data."""
    ndim = array.ndim
    magic = (0x08 << 8) | ndim if magic is None else magic
    header = struct.pack(f">I{ndim}I", magic, *array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def write_gz(path: Path, payload: bytes) -> str:
    path.write_bytes(gzip.compress(payload, mtime=0))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose brightness band depends on the label, so a model can learn something."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    noise = torch.randint(0, 40, (count, 28, 28), generator=generator)
    band = torch.zeros(count, 28, 28, dtype=torch.int64)
    for i, label in enumerate(labels.tolist()):
        band[i, label * 2 : label * 2 + 8, :] = 200
    return (noise + band).clamp(max=255).to(torch.uint8), labels.to(torch.uint8)


@pytest.fixture
def synthetic_mirror(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A folder with the four raw files (120 train, 40 test images) and their md5s."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    files = []
    for split, count in (("train", 120), ("test", 40)):
        images, labels = make_split(count, seed=len(split))
        images_name, labels_name = RAW_NAMES[split]
        files.append((images_name, write_gz(folder / images_name, idx_bytes(images))))
        files.append((labels_name, write_gz(folder / labels_name, idx_bytes(labels))))
    return folder, files


@pytest.fixture
def raw_dir(synthetic_mirror: tuple[Path, list[tuple[str, str]]]) -> Path:
    return synthetic_mirror[0]


@pytest.fixture
def small_params() -> Params:
    return parse_params(
        {
            "device": "cpu",
            "download": {"retries": 2, "backoff_s": 0.0, "timeout_s": 5.0},
            "preprocess": {"val_fraction": 0.25},
            "train": {"epochs": 2, "batch_size": 16, "num_threads": 1},
            "evaluate": {"batch_size": 32},
        }
    )


@pytest.fixture
def processed_dir(tmp_path: Path, raw_dir: Path, small_params: Params) -> Path:
    from stages.preprocess import preprocess

    out = tmp_path / "processed"
    preprocess.fn(small_params, raw_dir=raw_dir, processed_dir=out)
    return out


@pytest.fixture
def trained(tmp_path: Path, processed_dir: Path, small_params: Params) -> dict[str, Path]:
    from stages.train import train

    paths = {
        "processed_dir": processed_dir,
        "weights_path": tmp_path / "models" / "train" / "model_weights.pth",
        "live_dir": tmp_path / "reports" / "train",
    }
    train.fn(small_params, **paths)
    return paths


@pytest.fixture(scope="session")
def real_mirror() -> Path:
    mirror = Path(os.environ.get("FMNIST_MIRROR", SHARED_DATA))
    if not (mirror / RAW_NAMES["train"][0]).is_file():
        pytest.skip(f"the real FashionMNIST files are not at {mirror} (set FMNIST_MIRROR)")
    return mirror


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for running dvc and the stages as a user would, off the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "FMNIST"))}
    env.update(QUIET_ENV)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result
