"""How a stage runs: its logger, and whether Prefect records the run.

`python -m stages.<name>` (what dvc.yaml runs) parses its command line with stages/cli.py, then
calls `run_cli`. With a Prefect API configured (PREFECT_API_URL or a profile), the stage runs as
a Prefect task run on that server; without one it calls the task's function directly, so
`dvc repro` never pays for Prefect's temporary server. Either way the same function does the work.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import psutil
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

from stages.config import load_params
from stages.errors import StageError
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


def require_prefect_server(url: str) -> None:
    """Raises StageError unless a Prefect server answers its health check at `url` within 5 s."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as response:
            if response.status == 200:
                return
    except OSError as exc:
        raise StageError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({exc}); {START_SERVER_HINT}, "
            "or unset PREFECT_API_URL to run without Prefect recording the run"
        ) from None
    raise StageError(f"the Prefect server at {url} is not healthy; {START_SERVER_HINT}")


def run_cli(stage_task: Any, args: argparse.Namespace) -> int:
    """Validates the params file, runs the stage; returns the exit code.

    `args` comes from `stages.cli.parse_args`, which each stage calls before its heavy imports.
    SIGTERM and SIGINT stop the stage within a batch or so, replacing no out (train keeps its
    last checkpoint, so the next run resumes), with exit code 128 + the signal number.
    """
    name = stage_task.name
    stop_on_signals()
    # Prefect's import already gave the root logger its console handler; else add a plain one.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stages").setLevel(logging.INFO)
    log = stage_logger(name)
    try:
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
        if not as_task_run:
            stage_task.fn(params)
            return 0
        # A task run outside any flow run has nowhere to send its logs: keep them on the console.
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
