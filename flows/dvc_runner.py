"""DVC runs the pipeline; this module only changes how a `python -m stages.<name>` stage runs.

`reproduce()` calls DVC's own `Repo.reproduce` with a `repro_fn`, the per-stage hook that DVC's
experiment executor also uses. DVC still decides everything `dvc repro` decides: the stage
graph and its order, and (through `Stage.changed`) which stages are up to date. For a stage
whose command is `python -m stages.<name>` the hook calls that module's Prefect task in this
process, then saves, commits and dumps the stage with DVC's own methods, so dvc.lock and the
cache come out as `dvc repro` leaves them. Any other command takes DVC's own path.

The whole run holds DVC's repo lock and DVC's path locks (rwlock) on every out, so a flow run
and a `dvc repro` never interleave: whichever comes second fails within seconds with
`PipelineBusyError`, or waits (`wait_for_lock`).

tests/test_dvc_internals.py checks each DVC name used here, so a DVC upgrade that changes one
fails there, naming it, rather than here.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dvc.lock import LockError
from dvc.repo import Repo, lock_repo
from dvc.rwlock import rwlock
from dvc.stage import Stage
from prefect import Task, task
from prefect.cache_policies import NONE
from prefect.states import Completed, State

from stages.config import PARAMS_FILE, load_params
from stages.errors import StageError

STAGE_COMMAND = re.compile(r"^python3? -m stages\.(\w+)$")
NO_DEVICE = "none: no stage ran in process"


class PipelineBusyError(StageError):
    """Another `dvc repro` or flow run holds DVC's repo lock or a path this run writes."""


@dataclass
class StageRecord:
    status: str  # "ran" (its task, in process), "ran by DVC" (its command) or "up to date"
    seconds: float
    note: str = ""


@dataclass
class RunRecord:
    """What one run did, stage by stage, as it happened."""

    stages: dict[str, StageRecord] = field(default_factory=dict)
    device: str = NO_DEVICE


@task(cache_policy=NONE, persist_result=False)
def stand_in(state_name: str, note: str) -> State:
    """Stands for a stage that ran no task here (up to date, or run by DVC), so the UI shows
    every stage of every run."""
    return Completed(name=state_name, message=note)


def stage_task(stage: Stage) -> Task | None:
    """The Prefect task behind a `python -m stages.<name>` command; None for other commands."""
    match = STAGE_COMMAND.match(str(stage.cmd).strip())
    if not match:
        return None
    name = match.group(1)
    stage_fn = getattr(importlib.import_module(f"stages.{name}"), name, None)
    if not isinstance(stage_fn, Task):
        raise StageError(f"{stage.addressing}: stages/{name}.py defines no Prefect task `{name}`")
    not_persisted = [str(out) for out in stage.outs if not out.persist]
    if not_persisted:
        # DVC would consult its run cache for these; running the task instead could differ.
        raise StageError(
            f"{stage.addressing}: outs {', '.join(not_persisted)} lack `persist: true` in "
            "dvc.yaml; the flow runs a stage in process only when all its outs persist"
        )
    return stage_fn


def call_task(stage: Stage, stage_fn: Task, record: RunRecord) -> None:
    """Runs the task as DVC runs a command: in the stage's folder, DVC_ROOT set, params fresh."""
    root = stage.repo.root_dir
    params = load_params(Path(root) / PARAMS_FILE)  # read per stage, as DVC reads it per stage
    if record.device == NO_DEVICE:  # torch is imported only once a stage has work to do
        from stages.device import resolve_device

        record.device = str(resolve_device(params.device))
    options = getattr(importlib.import_module(stage_fn.fn.__module__), "prefect_options", None)
    if options is not None:  # task options (retries) a stage takes from params
        stage_fn = stage_fn.with_options(**options(params))
    previous_cwd, previous_root = Path.cwd(), os.environ.get("DVC_ROOT")
    os.chdir(stage.wdir)
    os.environ["DVC_ROOT"] = root
    try:
        stage_fn(params)
    finally:
        os.chdir(previous_cwd)
        if previous_root is None:
            os.environ.pop("DVC_ROOT", None)
        else:
            os.environ["DVC_ROOT"] = previous_root


def run_in_process(stage: Stage, command: Callable[[], None], no_commit: bool) -> None:
    """What DVC's `Stage.run` does around a stage's command, with `command` in its place."""
    stage.remove_outs(ignore_remove=False, force=False)  # persisted outs are only unprotected
    command()
    stage.save(allow_missing=False, run_cache=not no_commit)
    if not no_commit:
        stage.commit(allow_missing=False)
    stage.dump(update_pipeline=False)


def make_repro_fn(record: RunRecord) -> Any:
    """The per-stage step `Repo.reproduce` calls, in DVC's order, with DVC's arguments."""

    def repro_fn(
        stage: Stage, upstream: list[Stage] | None = None, force: bool = False, **kwargs: Any
    ) -> Stage | None:
        start = time.perf_counter()
        stage_fn = stage_task(stage)
        if stage_fn is None:  # DVC's own path, as `dvc repro` takes it
            reproduced = stage.reproduce(upstream=upstream, force=force, **kwargs)
            if reproduced is not None:
                stage.dump(update_pipeline=False)
            status, note = "ran by DVC", f"`{stage.cmd}`, run by DVC as `dvc repro` runs it"
        elif force or stage.changed(kwargs.get("allow_missing", False), upstream):
            command = partial(call_task, stage, stage_fn, record)
            run_in_process(stage, command, kwargs.get("no_commit", False))
            reproduced, status, note = stage, "ran", "its Prefect task, in the flow's process"
        else:
            reproduced = None
        if reproduced is None:
            status, note = "up to date", "deps, params and outs match dvc.lock"
        if status != "ran":
            state_name = "Cached" if reproduced is None else "Completed"
            stand_in.with_options(name=stage.name)(state_name, note)
        record.stages[stage.name] = StageRecord(status, time.perf_counter() - start, note)
        return reproduced

    return repro_fn


@contextmanager
def hold_pipeline(repo: Repo, wait: bool) -> Iterator[None]:
    """Holds DVC's repo lock, and its path locks on every out, until the block ends.

    `dvc repro` lets go of the repo lock while a stage's command runs, keeping only the path
    locks of that stage; asking for every out's path lock is how a run sees it mid-stage.
    """
    outs = [out.fs_path for stage in repo.index.stages for out in stage.outs]
    hardlink = repo.config["core"].get("hardlink_lock", False)
    while True:
        with ExitStack() as held:
            try:
                held.enter_context(lock_repo(repo))  # DVC's retries: seconds, or for ever
                # Under the command DVC itself records for this process's path locks.
                cmd = " ".join(sys.argv)
                held.enter_context(rwlock(repo.tmp_dir, repo.fs, cmd, [], outs, hardlink))
            except LockError as exc:
                busy = exc
            else:
                yield
                return
        if not wait:
            raise PipelineBusyError(
                f"pipeline busy: {busy}\ntry again when it ends, "
                "or pass --wait-for-lock (wait_for_lock=True)"
            )
        time.sleep(1)


def reproduce(root: Path, targets: list[str] | None, force: bool, wait_for_lock: bool) -> RunRecord:
    """`dvc repro [--force] [TARGET ...]` with in-process stages; returns what each stage did."""
    record = RunRecord()
    repo = Repo(str(root), _wait_for_lock=wait_for_lock)
    try:
        with hold_pipeline(repo, wait_for_lock):
            repo.reproduce(targets=targets or None, force=force, repro_fn=make_repro_fn(record))
    finally:
        repo.close()
    return record
