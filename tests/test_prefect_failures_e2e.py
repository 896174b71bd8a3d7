"""Prefect failures end a stage or a flow run within seconds, with one `error:` line naming the
culprit, and leave no process behind (issue 10).

Fake servers (tests/helpers/http.py) stand for a server that stalls and for one that is no Prefect
server; the signals and the server killed mid-run use real processes: the flow, in a copy of the
reproduced pipeline, and `make server`.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from stages.runtime import prefect_server_problem
from stages.signals import StageStopped

from .helpers.http import send_body, serve
from .helpers.prefect import server_process
from .helpers.repo import edit_params
from .helpers.tools import REPO, dvc, free_port, stop_session, tool_env

EPOCHS = 1000  # a train stage that runs until the test stops it
TRAINING = f"training {EPOCHS} epochs"
# The slowest a failure may take to end the run, from the moment it happens.
PROBE_LIMIT_S = 30  # imports (seconds on a busy 2-core machine), then a 5 s probe
SIGNAL_LIMIT_S = 20
SERVER_GONE_LIMIT_S = 40  # 5 s to call the server gone, then Prefect's last, capped, retries


def stalls_but_its_health(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event):
    """Healthy on /health; every other request waits until the server stops."""
    if handler.path.endswith("/health"):
        send_body(handler, b"true")
    else:
        stop.wait()


def answers_true_to_everything(
    handler: http.server.BaseHTTPRequestHandler, stop: threading.Event
) -> None:
    send_body(handler, b"true")


FAKES = {
    "stalls-but-its-health": (
        stalls_but_its_health,
        "answers /health but not its API (GET {api}/admin/version: no answer within",
    ),
    "answers-true-to-everything": (
        answers_true_to_everything,
        "does not look like a Prefect server (GET {api}/admin/version answered 'true'",
    ),
}


@contextmanager
def fake_prefect(name: str, lifetime_s: float = 60) -> Iterator[tuple[str, str]]:
    """The fake server's API URL, and what the error must say about it."""
    answer, message = FAKES[name]
    with serve(answer, lifetime_s=lifetime_s) as base:
        api = f"{base}api"
        yield api, message.format(api=api)


@pytest.mark.parametrize("fake", FAKES)
def test_the_probe_names_a_server_that_is_no_working_prefect_api(fake: str) -> None:
    with fake_prefect(fake) as (api, message):
        started = time.monotonic()
        problem = prefect_server_problem(api, timeout=1)
    assert problem is not None and message in problem, problem
    assert f"PREFECT_API_URL={api}" in problem
    assert time.monotonic() - started < 3


def test_the_probe_names_a_closed_port() -> None:
    api = f"http://127.0.0.1:{free_port()}/api"
    problem = prefect_server_problem(api, timeout=1)
    assert problem is not None
    assert problem.startswith(f"no Prefect server answers at PREFECT_API_URL={api} (")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fake", "module"),
    [
        ("stalls-but-its-health", "stages.export"),
        ("answers-true-to-everything", "flows.pipeline"),
    ],
)
def test_a_fake_prefect_server_is_refused_up_front(tmp_path: Path, fake: str, module: str) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with fake_prefect(fake) as (api, message):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", module],
            cwd=tmp_path,
            env=tool_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-home")),
            capture_output=True,
            text=True,
            timeout=PROBE_LIMIT_S * 3,  # the old code: minutes of Prefect's retries
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert elapsed < PROBE_LIMIT_S


def prefect_lookalike(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
    send_body(handler, b"true" if handler.path.endswith("/health") else b'"3.9.1"')


@contextmanager
def sigint_raises() -> Iterator[None]:
    """SIGINT raises StageStopped, as in a flow run (whose stop_on_signals would also make this
    process stop when its parent dies)."""

    def on_sigint(signum: int, _frame: object) -> None:
        raise StageStopped(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_watch_stops_the_run_once_its_server_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import prefect_server as flow_module

    monkeypatch.setattr(flow_module, "WATCH_EVERY_S", 0.1)
    monkeypatch.setattr(flow_module, "GONE_AFTER_S", 0.5)
    with sigint_raises(), pytest.raises(StageStopped), ExitStack() as server:
        api = f"{server.enter_context(serve(prefect_lookalike))}api"
        with flow_module.ServerWatch(api) as watch:
            time.sleep(1)
            assert watch.gone is None  # a working server is left alone
            server.close()
            gone_at = time.monotonic()
            time.sleep(10)  # what the run does, interrupted
    assert time.monotonic() - gone_at < 3
    assert watch.gone is not None
    assert watch.gone.startswith(f"no Prefect server answers at PREFECT_API_URL={api} (")


# Real processes: the flow in a copy of the reproduced pipeline.


def start_flow(repo: Path, logs: Path, **env: str) -> subprocess.Popen:
    """`python -m flows.pipeline` in a session of its own; stdout and stderr to files in logs."""
    logs.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline"],
        cwd=repo,
        env=tool_env(PREFECT_HOME=str(logs / "prefect-home"), **env),
        stdout=open(logs / "stdout", "w"),  # noqa: SIM115 - the child holds it
        stderr=open(logs / "stderr", "w"),  # noqa: SIM115
        start_new_session=True,
    )


def output(logs: Path) -> str:
    return (logs / "stdout").read_text() + (logs / "stderr").read_text()


def wait_for_training(flow: subprocess.Popen, logs: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while TRAINING not in output(logs):
        assert flow.poll() is None, f"the flow exited {flow.returncode}:\n{output(logs)[-3000:]}"
        assert time.monotonic() < deadline, f"no {TRAINING!r} in {timeout} s:\n{output(logs)}"
        time.sleep(0.1)


def family(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, wherever their session."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def survivors(processes: list[psutil.Process], pgid: int, grace_s: float = 5) -> list[str]:
    """Those of processes, and of process group pgid, still running after grace_s at most."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except (ProcessLookupError, psutil.Error):
                pass
        if not alive or time.monotonic() > deadline:
            return sorted({f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in alive})
        time.sleep(0.2)


def end(processes: list[psutil.Process]) -> None:
    """SIGKILL to what a failed test left running outside the flow's session."""
    for process in processes:
        with suppress(psutil.Error):
            process.kill()


def error_lines(logs: Path) -> list[str]:
    return [line for line in (logs / "stderr").read_text().splitlines() if line.startswith("error")]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-the-flow", "SIGINT-to-its-group-like-ctrl-c"],
)
def test_a_signal_stops_a_flow_on_its_temporary_server_leaving_no_process(
    pipeline_copy: Path, tmp_path: Path, signum: int, to_group: bool
) -> None:
    edit_params(pipeline_copy, train={"epochs": EPOCHS})
    logs = tmp_path / "logs"
    flow = start_flow(pipeline_copy, logs)  # no PREFECT_API_URL: a temporary server
    processes: list[psutil.Process] = []
    try:
        wait_for_training(flow, logs)
        processes = family(flow.pid)
        assert len(processes) > 1, "no temporary server was started"
        (os.killpg if to_group else os.kill)(flow.pid, signum)
        started = time.monotonic()
        returncode = flow.wait(timeout=SIGNAL_LIMIT_S * 3)  # the old code: 140 s for Ctrl-C
        elapsed = time.monotonic() - started
        left = survivors(processes, flow.pid)
    finally:
        stop_session(flow)
        end(processes)
    name = signal.Signals(signum).name
    assert returncode == 128 + signum, output(logs)[-3000:]
    assert elapsed < SIGNAL_LIMIT_S
    assert not left, f"left running: {left}"
    assert error_lines(logs) == [
        f"error: flow fashion-mnist-pipeline: stopped by {name}; the stages it finished keep "
        "their outs and dvc.lock entries, and the one it was running replaced no out (train "
        "resumes from its last checkpoint)"
    ], output(logs)[-3000:]
    assert "Traceback" not in output(logs)
    # The server lived until the flow had reported its end (Prefect's schema, read directly).
    with closing(sqlite3.connect(logs / "prefect-home" / "prefect.db")) as db:
        assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("CRASHED",)]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_server_killed_mid_run_stops_the_flow_within_seconds(
    pipeline_copy: Path, tmp_path: Path
) -> None:
    edit_params(pipeline_copy, train={"epochs": EPOCHS})
    weights = pipeline_copy / "models" / "train" / "model_weights.pth"
    before = weights.read_bytes()
    logs = tmp_path / "logs"
    with server_process(tmp_path / "server-home") as (api, server):
        flow = start_flow(pipeline_copy, logs, PREFECT_API_URL=api)
        processes: list[psutil.Process] = []
        try:
            wait_for_training(flow, logs)
            processes = family(flow.pid)
            os.killpg(server.pid, signal.SIGKILL)
            started = time.monotonic()
            returncode = flow.wait(timeout=SERVER_GONE_LIMIT_S * 3)  # the old code: all epochs
            elapsed = time.monotonic() - started
            left = survivors(processes, flow.pid)
        finally:
            stop_session(flow)
            end(processes)
    assert returncode == 1, output(logs)[-3000:]
    assert elapsed < SERVER_GONE_LIMIT_S
    assert not left, f"left running: {left}"
    (line,) = error_lines(logs)
    assert line.startswith(
        "error: the Prefect server went away mid-run: no Prefect server answers at "
        f"PREFECT_API_URL={api} ("
    ), output(logs)[-3000:]
    assert "the stages it finished keep their outs and dvc.lock entries" in line
    assert "Traceback" not in output(logs)
    # As the message says: validate ran and is recorded; train replaced nothing.
    status = json.loads(dvc(pipeline_copy, "status", "--json").stdout)
    assert "validate" not in status and "train" in status, status
    assert weights.read_bytes() == before
