"""A real `prefect server`, started with `make server` as a user would, and its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from .tools import REPO, VENV_BIN, free_port, stop_session, tool_env

# What a `make` run inside `make test` inherits, and must not pass to this independent make.
MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


def server_command(port: int) -> list[str]:
    """`make -s server PORT=port` in the checkout, with the tests' own venv and never pip.

    VENV names the venv these tests run in (the Makefile's .venv under `make test`), and -o (make's
    --assume-old) keeps its setup stamp as it is: a test never reinstalls the project.
    """
    return make_target(REPO, "server", f"PORT={port}")


@contextmanager
def running_server(home: Path, timeout: float = 120) -> Iterator[str]:
    """`make server` on a free port with PREFECT_HOME=home; yields the API URL, then stops it.

    PREFECT_UI_API_URL is left to the Makefile: a UI that works on this port (not 4200) shows that
    `make server` sets it.
    """
    with server_process(home, timeout) as (url, _):
        yield url


@contextmanager
def server_process(home: Path, timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """running_server's server, and its process (the leader of its own session), for a test that
    kills it; whatever is left of that session is stopped at the end."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = tool_env(PREFECT_HOME=str(home))
    for name in ("PREFECT_UI_API_URL", *MAKE_VARS):
        env.pop(name, None)
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            server_command(port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(url, server, log_path, timeout)
            yield url, server
        finally:
            stop_session(server)


def wait_healthy(url: str, server: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start:\n{log_path.read_text()}")
        time.sleep(0.5)


def prefect_api(url: str, path: str, body: dict | None = None, method: str | None = None) -> Any:
    """GET (or POST `body` as JSON, or `method`) to the Prefect server's REST API; returns the
    decoded JSON (None for an empty answer)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}{path}",
        data=data,
        method=method or ("GET" if body is None else "POST"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def wait_for_flow_run(url: str, run_id: str, timeout: float = 180) -> dict[str, Any]:
    """The flow run, read through the API once its state is final or `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        flow_run = prefect_api(url, f"/flow_runs/{run_id}")
        state = flow_run.get("state") or {}
        if state.get("type") in FINAL_STATES or time.monotonic() > deadline:
            return flow_run
        time.sleep(0.5)


def make_target(repo: Path, target: str, *variables: str) -> list[str]:
    """`make -s -C repo TARGET VAR=...` with the tests' own venv, never reinstalling it."""
    make = shutil.which("make")
    if make is None:
        raise RuntimeError(f"make is not installed; the tests run `make {target}`")
    venv = VENV_BIN.parent
    return [
        make,
        "-s",
        "-C",
        str(repo),
        f"--assume-old={venv}/.installed",
        target,
        *variables,
        f"VENV={venv}",
    ]


@contextmanager
def prefect_worker(
    repo: Path, url: str, pool: str, log_path: Path, **env: str
) -> Iterator[subprocess.Popen]:
    """`make worker POOL=pool` in `repo` (its own clone), as a worker machine runs it: `prefect
    worker start --pool pool --limit 1` with FMNIST_WORKER_REPO, for prefect.yaml's pull step, set
    to the clone. It polls every second (Prefect's default: 10 s), and is stopped at the end."""
    command = make_target(repo, "worker", f"POOL={pool}")
    worker_env = tool_env(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1", **env)
    for name in ("FMNIST_WORKER_REPO", *MAKE_VARS):
        worker_env.pop(name, None)
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            command,
            cwd=repo,
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield worker
    finally:
        stop_session(worker)


def processes_in(folder: Path) -> list[psutil.Process]:
    """The processes whose working directory is `folder` or below: a flow run's, for one."""
    found = []
    for process in psutil.process_iter():
        try:
            if Path(process.cwd()).is_relative_to(folder):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found
