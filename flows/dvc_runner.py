"""DVC runs the pipeline; this module only changes how a `python -m stages.<name>` stage runs.

`reproduce()` calls DVC's own `Repo.reproduce` with a `repro_fn`, the per-stage hook that DVC's
experiment executor also uses. DVC still decides everything `dvc repro` decides: the stage
graph and its order, and (through `Stage.changed`) which stages are up to date. For a stage
whose command is `python -m stages.<name>` the hook calls that module's Prefect task in this
process, then saves, commits and dumps the stage with DVC's own methods, so dvc.lock and the
cache come out as `dvc repro` leaves them. Any other command, and a frozen stage, takes DVC's
own per-stage step.

The run holds DVC's locks from start to end (flows/dvc_lock.py), so a flow run and a `dvc repro`
never interleave.

tests/test_dvc_internals.py checks each DVC name used here: an upgrade that changes one fails
there, naming it.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Callable
from contextlib import chdir
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from dvc.repo import Repo
from dvc.repo.reproduce import _reproduce_stage as reproduce_stage
from dvc.stage import Stage
from dvc.stage.cache import RunCacheNotFoundError
from prefect import Task, task
from prefect.cache_policies import NONE
from prefect.states import Completed, State

from flows.dvc_lock import hold_pipeline, require_writable_checkout
from stages.config import PARAMS_FILE, load_params
from stages.errors import StageError
from stages.inputs import watching_inputs
from stages.outs import restore_outs

STAGE_COMMAND = re.compile(r"^python3? -m stages\.(\w+)$")
NO_DEVICE = "none: no stage ran in process"


@dataclass
class StageRecord:
    status: Literal["ran", "restored", "reproduced by DVC", "up to date"]
    seconds: float
    note: str = ""


@dataclass
class RunRecord:
    """What one run did, stage by stage, as it happened."""

    stages: dict[str, StageRecord] = field(default_factory=dict)
    device: str = NO_DEVICE


@task(cache_policy=NONE, persist_result=False)
def stand_in(state_name: str, note: str) -> State:
    """A stage that ran no task here (up to date, or reproduced by DVC), shown in the UI."""
    return Completed(name=state_name, message=note)


def in_process_name(stage: Stage) -> str | None:
    """<name> for a `python -m stages.<name>` stage the flow runs in process; else None."""
    match = STAGE_COMMAND.match(str(stage.cmd).strip())
    if not match or stage.frozen:  # DVC only checks a frozen stage's outs: its own step does
        return None
    return match.group(1)


def stage_task(stage: Stage, name: str) -> Task:
    """The Prefect task `stages/<name>.py` defines under its own name."""
    stage_fn = getattr(importlib.import_module(f"stages.{name}"), name, None)
    if not isinstance(stage_fn, Task):
        raise StageError(f"{stage.addressing}: stages/{name}.py defines no Prefect task `{name}`")
    return stage_fn


def call_task(stage: Stage, stage_fn: Task, record: RunRecord) -> None:
    """Runs the task as DVC runs a command: in the stage's folder, DVC_ROOT set, params fresh."""
    root = stage.repo.root_dir
    params = load_params(Path(root) / PARAMS_FILE)  # read per stage, as DVC reads it per stage
    if record.device == NO_DEVICE:  # for the run summary; a stage that needs it fails by itself
        from stages.device import resolve_device

        try:
            record.device = str(resolve_device(params.device))
        except StageError as exc:
            record.device = f"unavailable: {exc}"
    options = getattr(importlib.import_module(stage_fn.fn.__module__), "prefect_options", None)
    if options is not None:  # task options (retries) a stage takes from params
        stage_fn = stage_fn.with_options(**options(params))
    previous_root = os.environ.get("DVC_ROOT")
    os.environ["DVC_ROOT"] = root
    try:
        with chdir(stage.wdir), watching_inputs(stage_fn.name, params, Path(root) / PARAMS_FILE):
            stage_fn(params)
    finally:
        if previous_root is None:
            os.environ.pop("DVC_ROOT", None)
        else:
            os.environ["DVC_ROOT"] = previous_root


def run_in_process(stage: Stage, command: Callable[[], None], force: bool, no_commit: bool) -> bool:
    """What DVC's `Stage.run` does around a stage's command, with `command` in its place:
    remove the outs, restore them from the run-cache if it has this stage's deps and params
    (unless forced), else run. Returns whether `command` ran. A failed command puts the outs
    back (stages/outs.py), as a failed `python -m stages.<name>` does under `dvc repro`."""
    stage.remove_outs(ignore_remove=False, force=False)
    try:
        if force:
            raise RunCacheNotFoundError(stage)
        stage.repo.stage_cache.restore(stage)  # logs "Stage '<name>' is cached - skipping run"
        ran = False
    except RunCacheNotFoundError:
        stage.save_deps()
        try:
            command()
        except BaseException:
            restore_outs(stage)
            raise
        ran = True
    stage.save(allow_missing=False, run_cache=not no_commit)
    if not no_commit:
        stage.commit(allow_missing=False)
    stage.dump(update_pipeline=False)
    return ran


def make_repro_fn(record: RunRecord) -> Callable[..., Stage | None]:
    """The per-stage step `Repo.reproduce` calls, in DVC's order, with DVC's arguments."""

    def repro_fn(
        stage: Stage, upstream: list[Stage] | None = None, force: bool = False, **kwargs: Any
    ) -> Stage | None:
        start = time.perf_counter()
        name = in_process_name(stage)
        if name is None:  # DVC's own per-stage step, as `dvc repro` takes it
            reproduced = reproduce_stage(stage, upstream=upstream, force=force, **kwargs)
            status, note = "reproduced by DVC", f"`{stage.cmd}`: run, or restored from its cache"
        elif force or stage.changed(kwargs.get("allow_missing", False), upstream):
            command = partial(call_task, stage, stage_task(stage, name), record)
            reproduced = stage
            if run_in_process(stage, command, force, kwargs.get("no_commit", False)):
                status, note = "ran", "its Prefect task, in the flow's process"
            else:
                status, note = "restored", "outs restored from DVC's run-cache, not rerun"
        else:
            reproduced = None
        if reproduced is None:
            status, note = "up to date", "deps, params and outs match dvc.lock"
        if status != "ran":
            state_name = "Completed" if status == "reproduced by DVC" else "Cached"
            stand_in.with_options(name=stage.name)(state_name, note)
        record.stages[stage.name] = StageRecord(status, time.perf_counter() - start, note)
        return reproduced

    return repro_fn


def reproduce(root: Path, targets: list[str] | None, force: bool, wait_for_lock: bool) -> RunRecord:
    """`dvc repro [--force] [TARGET ...]` with in-process stages; returns what each stage did."""
    record = RunRecord()
    require_writable_checkout(root)
    with Repo(str(root), _wait_for_lock=wait_for_lock) as repo, hold_pipeline(repo, wait_for_lock):
        repo.reproduce(targets=targets or None, force=force, repro_fn=make_repro_fn(record))
    return record
