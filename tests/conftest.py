"""Shared fixtures: tiny synthetic IDX files for unit tests, the real data for end-to-end tests."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

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
            # The earlier Adam defaults: on 90 images they learn steadily, where the defaults'
            # one-cycle peak rate of 0.1 is tuned for 54,000.
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "num_threads": 1,
                "optimizer": "adam",
                "learning_rate": 1e-3,
                "scheduler": "none",
                "weight_decay": 0.0,
                "label_smoothing": 0.0,
            },
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


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the API URL."""
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The UI's browser code calls the API at PREFECT_UI_API_URL, which defaults to port 4200.
    env = tool_env(PREFECT_HOME=str(home), PREFECT_UI_API_URL=url)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server did not start:\n{(home / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        stop_session(server)
        log.close()


def stop_session(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stops a process started with start_new_session=True, and its children, by its PID."""
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def copy_repo(dest: Path) -> Path:
    """The project's files as git sees them (tracked or new), in a new git repo with a commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


def edit_params(repo: Path, **sections: dict) -> None:
    """Merges each section dict into the copy's params.yaml; a scalar replaces a top-level key."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(key, {}).update(values)
        else:
            params[key] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def prefect_api(url: str, path: str, body: dict | None = None) -> Any:
    """GET (or POST `body` as JSON) to the Prefect server's REST API; returns the decoded JSON."""
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}{path}",
        data=data,
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


SMALL = {"train": {"epochs": 1, "batch_size": 128}}


def dvc(repo: Path, *args: str, check: bool = True, **env: str):
    return run(["dvc", *args], repo, tool_env(**env), check=check)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, real_mirror: Path) -> tuple[Path, str]:
    """A repo copy with small params after one full `dvc repro`."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    edit_params(repo, **SMALL)
    result = dvc(repo, "repro", FMNIST_MIRROR=str(real_mirror))
    return repo, result.stdout + result.stderr


@pytest.fixture
def pipeline_copy(pipeline: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the reproduced pipeline (DVC cache included) for tests that change it."""
    return clone_pipeline(pipeline[0], tmp_path / "repo")


def clone_pipeline(source: Path, dest: Path) -> Path:
    """A copy of a reproduced repo, DVC cache included, without DVC's locks and state."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
    return dest


def perturb_weights(path: Path) -> None:
    """Other weights of the same shape: a rerun that got far would write different outs."""
    state = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(v.shape, generator=generator) for k, v in state.items()}, path)
