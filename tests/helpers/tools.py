"""Running dvc, the stages and other commands as a user would: environment, processes, ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The Makefile exports the same: no analytics, and time for Prefect's temporary server.
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "DVC_STUDIO_OFFLINE": "1",  # `dvc artifacts get` asks DVC Studio first when it has a token
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "ORT_DISABLE_TELEMETRY": "1",
}


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


def dvc(repo: Path, *args: str, check: bool = True, **env: str):
    return run(["dvc", *args], repo, tool_env(**env), check=check)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_session(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stops a process started with start_new_session=True and all of its process group.

    SIGTERM to the group, then SIGKILL to whatever of it is left after `timeout` seconds; returns
    once the leader is reaped and (but for unreaped zombies) no process of the group remains.
    """
    deadline = time.monotonic() + timeout
    if not _signal_group(process.pid, signal.SIGTERM):
        if process.poll() is None:
            raise ValueError(f"process {process.pid} was not started with start_new_session=True")
        return  # it and its group are gone already
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
    # Children that outlive the leader, e.g. a server's workers. Zombies count as alive (where no
    # init reaps them they stay), so this gives up 5 s after a SIGKILL.
    killed = False
    while _signal_group(process.pid, 0):
        if time.monotonic() > deadline:
            if killed:
                return
            _signal_group(process.pid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 5
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> bool:
    """Sends sig to the process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True
