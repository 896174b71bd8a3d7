"""A stage stops cleanly: on SIGTERM or SIGINT, and when the `dvc repro` that started it dies.

Real `python -m stages.train` processes on the tiny synthetic split; no out is replaced and the
last checkpoint stays for the next run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from stages.config import CHECKPOINT, TRAINED_WEIGHTS, Params

from .helpers.tools import tool_env


@pytest.fixture
def long_training(tmp_path: Path, processed_dir: Path, small_params: Params) -> Path:
    """A folder where `python -m stages.train` would train for hours on the synthetic split."""
    repo = tmp_path / "repo"
    shutil.copytree(processed_dir, repo / "data" / "processed")
    params = small_params.model_dump(mode="json")
    params["train"]["epochs"] = 1_000_000
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    return repo


def wait_for(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{log.read_text()}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_training_keeping_the_checkpoint(long_training: Path, signum: int) -> None:
    log = long_training / "train.log"
    with open(log, "w") as output:
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages.train"],
            cwd=long_training,
            env=tool_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        wait_for(log, "epoch 2/")
        stage.send_signal(signum)
        started = time.monotonic()
        assert stage.wait(timeout=30) == 128 + signum
    assert time.monotonic() - started < 10
    name = signal.Signals(signum).name
    assert f"error: train: stopped by {name}; no out was replaced" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert not (long_training / TRAINED_WEIGHTS).exists()
    assert (long_training / CHECKPOINT).is_file()


TRAIN = [sys.executable, "-m", "stages.train"]


# DVC starts a stage through `$SHELL -c`; dash (/bin/sh) forks it rather than becoming it.
@pytest.mark.parametrize(
    "command", [TRAIN, ["/bin/sh", "-c", " ".join(TRAIN)]], ids=["directly", "through-dash"]
)
def test_a_stage_stops_when_the_process_that_started_it_dies(
    long_training: Path, command: list[str]
) -> None:
    # Stands for `dvc repro`, which does not pass a SIGTERM on to the stage it runs.
    parent_code = (
        "import subprocess\n"
        f"stage = subprocess.Popen({command!r},\n"
        "                         stdout=open('train.log', 'w'), stderr=subprocess.STDOUT)\n"
        "print(stage.pid, flush=True)\n"
        "stage.wait()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        cwd=long_training,
        env=tool_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    stage_pid = int(parent.stdout.readline())
    try:
        wait_for(long_training / "train.log", "epoch 2/")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not gone(stage_pid):
            assert time.monotonic() < deadline, "the stage outlived the process that started it"
            time.sleep(0.05)
    finally:
        if not gone(stage_pid):
            psutil.Process(stage_pid).kill()
    assert "stopped by SIGTERM" in (long_training / "train.log").read_text()
    assert not (long_training / TRAINED_WEIGHTS).exists()
    assert (long_training / CHECKPOINT).is_file()
