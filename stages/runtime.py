"""How a stage runs: its logger, and whether Prefect records the run.

`python -m stages.<name>` (what dvc.yaml runs) parses its command line with stages/cli.py, then
calls `run_cli`. With a Prefect API configured (PREFECT_API_URL or a profile), the stage runs as
a Prefect task run on that server; without one it calls the task's function directly, so
`dvc repro` never pays for Prefect's temporary server. Either way the same function does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from typing import Any

import psutil
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

from stages.config import load_params
from stages.errors import StageError
from stages.inputs import watching_inputs
from stages.outs import restoring_outs
from stages.signals import StageStopped, stop_on_signals


def stage_logger(stage: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow run (so the UI shows it), else `stages.<stage>`.

    Named by stage, not __name__, which is "__main__" under `python -m stages.<stage>`.
    """
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(f"stages.{stage}")


START_SERVER_HINT = (
    "start one with `make server` (it runs `prefect server start --host 127.0.0.1 --port 4200` "
    "with the UI set up for that port) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
)


def prefect_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


PROBE_TIMEOUT_S = 5.0
PROBE_MAX_BYTES = 4096  # a version is a few bytes; anything may answer, at any length
# What /admin/version answers: "3.4.1", "3.6.0.dev3", ...
PREFECT_VERSION = re.compile(r"^\d+\.\d+")


def _probe_get(url: str, deadline: float) -> bytes:
    """GET url's body (its first PROBE_MAX_BYTES), all before `deadline` or OSError."""
    import urllib.request

    timeout = max(deadline - time.monotonic(), 0.5)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read(PROBE_MAX_BYTES)


def _probe_failure(exc: OSError, timeout: float) -> str:
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return str(exc)  # "HTTP Error 500: Internal Server Error"
    reason = getattr(exc, "reason", exc)  # URLError wraps the socket's error
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(reason)


def prefect_server_problem(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url` is no working Prefect API, naming it; None when it is.

    A Prefect server must answer GET /health, then GET /admin/version (the first call Prefect's
    client makes) with a version, all within `timeout` seconds. Prefect's own client would wait
    60 s per request and retry 5 times on a server that stalls, and fail with "Invalid version"
    on something that is no Prefect server.
    """
    base = url.rstrip("/")
    deadline = time.monotonic() + timeout
    try:
        _probe_get(f"{base}/health", deadline)
    except OSError as exc:
        failure = _probe_failure(exc, timeout)
        return f"no Prefect server answers at PREFECT_API_URL={url} ({failure})"
    try:
        body = _probe_get(f"{base}/admin/version", deadline)
    except OSError as exc:
        return (
            f"the server at PREFECT_API_URL={url} answers /health but not its API "
            f"(GET {base}/admin/version: {_probe_failure(exc, timeout)})"
        )
    try:
        version = json.loads(body)
    except ValueError:
        version = None
    if isinstance(version, str) and PREFECT_VERSION.match(version):
        return None
    shown = body[:60].decode(errors="replace")
    hint = "" if base.endswith("/api") else "; a Prefect API's URL ends in /api"
    return (
        f"the server at PREFECT_API_URL={url} does not look like a Prefect server "
        f"(GET {base}/admin/version answered {shown!r}, not a Prefect version{hint})"
    )


def require_prefect_server(url: str) -> None:
    """Raises StageError, naming `url`, unless a Prefect server answers there within 5 s."""
    problem = prefect_server_problem(url)
    if problem is not None:
        raise StageError(
            f"{problem}; {START_SERVER_HINT}, "
            "or unset PREFECT_API_URL to run without Prefect recording the run"
        )


def run_cli(stage_task: Any, args: argparse.Namespace) -> int:
    """Validates the params file, runs the stage; returns the exit code.

    `args` comes from `stages.cli.parse_args`, which each stage calls before its heavy imports.
    SIGTERM and SIGINT stop the stage within a batch or so, with exit code 128 + the signal
    number (train keeps its last checkpoint, so the next run resumes). A stage DVC runs that
    fails or stops puts back the outs DVC removed before it ran (stages/outs.py).
    """
    name = stage_task.name
    stop_on_signals()
    # Prefect's import already gave the root logger its console handler; else add a plain one.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stages").setLevel(logging.INFO)
    log = stage_logger(name)
    try:
        with restoring_outs(name):
            params = load_params(args.params)
            api_url = prefect_api_url()
            if api_url:
                require_prefect_server(api_url)
            as_task_run = bool(api_url)
            log.info(
                "%s: starting %.2f s after process start (as a Prefect task run: %s)",
                name,
                time.time() - psutil.Process().create_time(),
                as_task_run,
            )
            with watching_inputs(name, params, args.params):
                if not as_task_run:
                    stage_task.fn(params)
                    return 0
                # A task run outside any flow run has nowhere to send its logs: keep them on the
                # console.
                with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
                    stage_task(params)
    except StageError as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 1
    except StageStopped as stop:
        print(
            f"error: {name}: stopped by {stop}; no out was replaced "
            "(train keeps its last checkpoint: the next run resumes from it)",
            file=sys.stderr,
        )
        return 128 + stop.signum
    return 0
