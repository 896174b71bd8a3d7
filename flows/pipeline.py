"""python -m flows.pipeline [--force] [--target STAGE ...] [--wait-for-lock]

The whole pipeline as one Prefect flow, `fashion-mnist-pipeline`, sharing DVC's truth.

DVC decides everything `dvc repro` decides: the stage graph and its order, which stages are up
to date, and what goes into dvc.lock and the DVC cache. The flow only changes how
a stage's command runs: instead of a `python -m stages.<name>` subprocess it calls that module's
Prefect task in-process, so each stage is a real task run with its logs in the UI. A stage DVC
finds up to date becomes a task run in a Completed state named `Cached`, with the reason.

The flow holds DVC's repo lock from start to end, so it and a `dvc repro` never interleave: the
one that comes second fails within seconds with a clear "busy" error, or waits if asked to
(`--wait-for-lock` here, `dvc --wait-for-lock repro` there).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
from dvc.exceptions import DvcException
from dvc.lock import LockError
from dvc.repo import Repo, lock_repo
from dvc.stage import Stage
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from prefect.states import Completed, State

from stages.config import EVAL_DIR, PARAMS_FILE, Params, load_params
from stages.errors import StageError
from stages.runtime import prefect_api_url, require_prefect_server

FLOW_NAME = "fashion-mnist-pipeline"
STAGE_COMMAND = re.compile(r"^python3? -m (stages\.(\w+))$")


class PipelineBusyError(StageError):
    """Another `dvc repro` or flow run holds the DVC repo lock."""


@dataclass
class StageRecord:
    status: str  # "ran" or "cached"
    seconds: float
    reason: str = ""


NO_DEVICE = "none: no stage ran in process"


@dataclass
class RunLog:
    stages: dict[str, StageRecord] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)  # stages whose command ran, in process or not
    device: str = NO_DEVICE


@task(cache_policy=NONE, persist_result=False)
def cached_stage(reason: str) -> State:
    """Stands for a stage DVC did not need to run, so the UI shows every stage of every run."""
    return Completed(name="Cached", message=reason)


def stage_task(stage: Stage, params: Params) -> Any | None:
    """The Prefect task behind a `python -m stages.<name>` command, or None for other commands.

    A stage module may define `prefect_options(params)`: task options (retries) from params.
    """
    match = STAGE_COMMAND.match(str(stage.cmd).strip())
    if not match:
        return None
    module = importlib.import_module(match.group(1))
    stage_fn = getattr(module, match.group(2))
    options = getattr(module, "prefect_options", None)
    return stage_fn.with_options(**options(params)) if options else stage_fn


@contextmanager
def in_process_commands(params: Params, log: RunLog) -> Iterator[None]:
    """Makes DVC run a stage's command by calling its task in this process.

    DVC's run_stage() calls `unlocked_repo(cmd_run)(stage)`: both names are looked up in
    dvc.stage.run when a stage runs, so replacing them there swaps only the execution. Everything
    around it (handling the persisted outs, saving, committing) stays DVC's own.
    """
    import dvc.stage.run as dvc_run

    subprocess_run = dvc_run.cmd_run

    def cmd_run(stage: Stage, dry: bool = False, run_env: dict | None = None) -> None:
        stage_fn = stage_task(stage, params)
        if stage_fn is None or dry:
            subprocess_run(stage, dry=dry, run_env=run_env)
            if not dry:
                log.ran.add(stage.name)
            return
        if log.device == NO_DEVICE:  # torch is imported only once a stage has work to do
            from stages.device import resolve_device

            log.device = str(resolve_device(params.device))
        previous_cwd, previous_root = Path.cwd(), os.environ.get("DVC_ROOT")
        os.chdir(stage.wdir)
        os.environ["DVC_ROOT"] = stage.repo.root_dir  # as DVC sets it for a command
        try:
            stage_fn(params)
        finally:
            os.chdir(previous_cwd)
            if previous_root is None:
                os.environ.pop("DVC_ROOT", None)
            else:
                os.environ["DVC_ROOT"] = previous_root
        log.ran.add(stage.name)

    def keep_lock(function: Callable) -> Callable:
        # DVC releases its lock while a command runs; an in-process task has no need of that,
        # and keeping it is what stops a concurrent `dvc repro` from starting mid-run.
        return function

    saved = dvc_run.cmd_run, dvc_run.unlocked_repo
    dvc_run.cmd_run, dvc_run.unlocked_repo = cmd_run, keep_lock
    try:
        yield
    finally:
        dvc_run.cmd_run, dvc_run.unlocked_repo = saved


def make_repro_fn(log: RunLog) -> Callable[..., Stage | None]:
    """DVC's per-stage step (Stage.reproduce, then its dvc.lock entry), recording each stage."""

    def repro_fn(stage: Stage, **kwargs: Any) -> Stage | None:
        start = time.perf_counter()
        reproduced = stage.reproduce(**kwargs)
        if reproduced is not None:
            stage.dump(update_pipeline=False)
        seconds = time.perf_counter() - start
        if stage.name in log.ran:
            log.stages[stage.name] = StageRecord("ran", seconds)
            return reproduced
        reason = (
            "restored from DVC's run cache"
            if reproduced is not None
            else "up to date: deps, params and outs match dvc.lock"
        )
        cached_stage.with_options(name=stage.name)(reason)
        log.stages[stage.name] = StageRecord("cached", seconds, reason)
        return reproduced

    return repro_fn


def stage_runs_in_progress(repo: Repo) -> list[str]:
    """Other processes that DVC records as running a stage right now.

    `dvc repro` lets go of the repo lock while a stage's command runs and keeps only per-path
    locks (.dvc/tmp/rwlock), so the repo lock alone does not show it is busy. It edits that file
    only while it holds the repo lock, so the file is stable while we hold it.
    """
    try:
        table = json.loads((Path(repo.tmp_dir) / "rwlock").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    holders = [*table.get("write", {}).values()]
    holders += [info for infos in table.get("read", {}).values() for info in infos]
    return sorted(
        {
            f"PID {h['pid']}: {h['cmd']}"
            for h in holders
            if h["pid"] != os.getpid() and psutil.pid_exists(h["pid"])
        }
    )


@contextmanager
def hold_pipeline(repo: Repo, wait: bool) -> Iterator[None]:
    """Holds DVC's repo lock, once no other runner is mid-stage, until the block ends."""
    root = repo.root_dir
    while True:
        with ExitStack() as held:
            try:
                held.enter_context(lock_repo(repo))  # DVC's own retries: 3 s, or for ever
            except LockError:
                raise PipelineBusyError(
                    f"pipeline busy: another `dvc repro` or flow run holds {root}/.dvc/tmp/lock; "
                    "try again when it ends, or pass --wait-for-lock (wait_for_lock=True)"
                ) from None
            running = stage_runs_in_progress(repo)
            if not running:
                yield
                return
        if not wait:
            raise PipelineBusyError(
                f"pipeline busy: {'; '.join(running)}; try again when it ends, "
                "or pass --wait-for-lock (wait_for_lock=True)"
            )
        time.sleep(1)


def code_and_params_tags(root: Path) -> list[str]:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "none"
    params_hash = hashlib.sha256((root / PARAMS_FILE).read_bytes()).hexdigest()[:10]
    return [f"git:{revision}", f"params:{params_hash}"]


def tag_this_flow_run(tags: list[str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=sorted({*run.tags, *tags}))


def publish_artifacts(root: Path, log: RunLog) -> None:
    metrics_path = root / EVAL_DIR / "metrics.json"
    per_class_path = root / EVAL_DIR / "per_class.csv"
    if metrics_path.is_file() and per_class_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        create_table_artifact(
            key="test-metrics",
            table=[{"metric": k, "value": v} for k, v in metrics.items()],
            description="Test-split metrics (reports/evaluate/metrics.json)",
        )
        create_table_artifact(
            key="per-class-metrics",
            table=pd.read_csv(per_class_path).to_dict(orient="records"),
            description="Per-class precision, recall and F1 on the test split",
        )
    rows = "\n".join(
        f"| {name} | {record.status} | {record.seconds:.1f} s | {record.reason} |"
        for name, record in log.stages.items()
    )
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=f"# FashionMNIST pipeline\n\nDevice: `{log.device}`\n\n"
        f"| stage | status | wall time | note |\n|---|---|---|---|\n{rows}\n",
        description="What this run did",
    )


@flow(name=FLOW_NAME)
def pipeline(
    force: bool = False, targets: list[str] | None = None, wait_for_lock: bool = False
) -> dict[str, str]:
    """Reproduces the DVC pipeline (or `targets` and what they need), stage by stage as tasks.

    force: rerun every stage even when DVC finds it up to date (like `dvc repro --force`).
    targets: stage names to reproduce with their upstream stages (like `dvc repro TARGET`).
    wait_for_lock: wait for a concurrent `dvc repro` or flow run instead of failing at once.
    """
    logger = get_run_logger()
    logger.info("flow run id %s", flow_run.id)
    repo = Repo(_wait_for_lock=wait_for_lock)
    root = Path(repo.root_dir)
    params = load_params(root / PARAMS_FILE)
    tag_this_flow_run(code_and_params_tags(root))
    log = RunLog()
    try:
        with hold_pipeline(repo, wait_for_lock), in_process_commands(params, log):
            repo.reproduce(targets=targets or None, force=force, repro_fn=make_repro_fn(log))
    finally:
        repo.close()
    publish_artifacts(root, log)
    summary = {name: record.status for name, record in log.stages.items()}
    logger.info("stages: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="STAGE",
        help="reproduce this stage and what it needs (repeatable)",
    )
    parser.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="wait for a concurrent dvc repro or flow run instead of failing",
    )
    args = parser.parse_args(argv)
    try:
        if api_url := prefect_api_url():
            require_prefect_server(api_url)
        pipeline(force=args.force, targets=args.targets, wait_for_lock=args.wait_for_lock)
    except (StageError, DvcException) as exc:
        # DVC wraps a failed stage's error ("failed to reproduce 'train'"): show both.
        cause = f": {exc.__cause__}" if isinstance(exc.__cause__, StageError) else ""
        print(f"error: {exc}{cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
