"""Prefect workers end to end (docs/workers.md): prefect.yaml deployed with `prefect deploy` from
one clone, its runs picked up by `prefect worker start` in another clone (a worker machine's
checkout), which pushes to the shared DVC remote what the first clone then pulls."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .helpers.cache import lock_md5, object_in
from .helpers.git import commit_all, fresh_clone
from .helpers.prefect import (
    MAKE_VARS,
    make_target,
    prefect_api,
    prefect_worker,
    processes_in,
    wait_for_flow_run,
)
from .helpers.repo import clone_pipeline, edit_params
from .helpers.tools import REPO, VENV_BIN, dvc, run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POOL = "fashion-mnist"  # prefect.yaml's work pool
DEPLOYMENT = "fashion-mnist-pipeline/worker"
STAGES = ["validate", "download", "preprocess", "train", "evaluate", "export"]
CARD = "models/model_card.json"


def prefect(repo: Path, api: str, *args: str) -> subprocess.CompletedProcess:
    """The prefect CLI in `repo`, as a user with PREFECT_API_URL set; never prompts."""
    command = [str(VENV_BIN / "prefect"), "--no-prompt", *args]
    return run(command, repo, tool_env(PREFECT_API_URL=api))


@dataclass
class Team:
    origin: Path  # the reproduced pipeline, committed and pushed
    remote: Path  # the shared DVC remote (a folder)
    worker: Path  # the worker machine's clone, after `dvc pull`
    submitter: Path  # a clone with no outs, which deploys and starts runs


@pytest.fixture(scope="module")
def team(
    pipeline: tuple[Path, str], prefect_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Team:
    """The reproduced pipeline committed with a folder remote and pushed; a worker's clone that
    has pulled it; the work pool created and prefect.yaml deployed from a third clone, with no
    outs. The module's tests share it in file order: the dead-worker test comes last, as it
    leaves the worker's clone with changed params."""
    tmp_path = tmp_path_factory.mktemp("team")
    repo = clone_pipeline(pipeline[0], tmp_path / "origin")
    api = prefect_server
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    commit_all(repo, "a reproduced pipeline, its remote and prefect.yaml")
    dvc(repo, "push")
    worker = fresh_clone(repo, tmp_path / "worker")
    dvc(worker, "pull")
    submitter = fresh_clone(repo, tmp_path / "submitter")
    env = tool_env(PREFECT_API_URL=api)
    for name in MAKE_VARS:
        env.pop(name, None)
    result = run(make_target(submitter, "deploy"), submitter, env)  # pool, deployment, automation
    assert DEPLOYMENT in result.stdout, result.stdout
    return Team(repo, remote, worker, submitter)


def start_run(team: Team, api: str, *params: str) -> str:
    """`prefect deployment run` from the submitter, each param as `--param`; the flow run's id."""
    args = [arg for param in params for arg in ("--param", param)]
    created = prefect(team.submitter, api, "deployment", "run", DEPLOYMENT, *args).stdout
    match = re.search(r"UUID: ([0-9a-f-]{36})", created)
    assert match, created
    return match.group(1)


def task_states(api: str, run_id: str) -> dict[str, str]:
    runs = prefect_api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}  # "train-a2f"


AUTOMATIONS = REPO / "flows" / "automations.yaml"
CHECKPOINT = "models/checkpoints/train.pt"
QUICK = ['targets=["validate"]', "pull=false", "push=false"]  # a run of a few seconds


def running_span(api: str, run_id: str) -> tuple[str, str]:
    """When the flow run started Running and when it ended; it must have started exactly once."""
    states = prefect_api(api, f"/flow_run_states/?flow_run_id={run_id}")
    states.sort(key=lambda state: state["timestamp"])
    running = [state["timestamp"] for state in states if state["type"] == "RUNNING"]
    assert len(running) == 1, [state["name"] for state in states]
    return running[0], states[-1]["timestamp"]


def test_workers_in_their_own_clone_run_each_flow_run_once_one_at_a_time_and_push_the_outs(
    team: Team, prefect_server: str, tmp_path: Path
) -> None:
    api = prefect_server
    deployment = prefect_api(api, f"/deployments/name/{DEPLOYMENT}")
    assert deployment["work_pool_name"] == POOL
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["pull_steps"] == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $FMNIST_WORKER_REPO }}"
            }
        }
    ]
    # The remote loses the model card, which the worker's clone has: only its push restores it.
    md5 = lock_md5(team.origin, CARD)
    lost = object_in(team.remote, md5)
    lost.unlink()

    # Two workers poll the pool, whose concurrency limit is 1: each run runs once, one at a time.
    prefect(team.submitter, api, "work-pool", "set-concurrency-limit", POOL, "1")
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    try:
        with (
            prefect_worker(team.worker, api, POOL, logs[0]),
            prefect_worker(team.worker, api, POOL, logs[1]),
        ):
            full = start_run(team, api, "pull=true", "push=true")
            quick = start_run(team, api, *QUICK)
            for run_id in (full, quick):
                flow_run = wait_for_flow_run(api, run_id, timeout=180)
                output = "".join(log.read_text() for log in logs)
                assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], output)
                assert flow_run["work_pool_name"] == POOL
    finally:
        prefect(team.submitter, api, "work-pool", "clear-concurrency-limit", POOL)
    assert task_states(api, full) == dict.fromkeys(STAGES, "Cached")
    first, second = sorted(running_span(api, run_id) for run_id in (full, quick))
    assert first[1] <= second[0], f"the runs overlapped: {first}, {second}"
    assert processes_in(team.worker) == []
    assert lost.is_file(), "the worker's push did not restore the model card"

    dvc(team.submitter, "pull")
    assert "up to date" in dvc(team.submitter, "status").stdout
    assert "in sync" in dvc(team.submitter, "status", "-c").stdout
    assert (team.submitter / CARD).read_bytes() == (team.origin / CARD).read_bytes()


def shorten_silence_window(api: str, seconds: int) -> None:
    """The shipped automation, made by `make deploy`, with a window just over one heartbeat (30 s)
    instead of 90 s, so the test waits less."""
    [automation] = yaml.safe_load(AUTOMATIONS.read_text())["automations"]
    [found] = prefect_api(
        api, "/automations/filter", {"automations": {"name": {"any_": [automation["name"]]}}}
    )
    automation["trigger"]["within"] = seconds
    prefect_api(api, f"/automations/{found['id']}", automation, method="PUT")


def test_a_dead_workers_run_turns_crashed_and_a_rerun_resumes_training(
    team: Team, prefect_server: str, tmp_path: Path
) -> None:
    api = prefect_server
    shorten_silence_window(api, 32)
    with prefect_worker(team.worker, api, POOL, tmp_path / "dying.log"):
        healthy = start_run(team, api, *QUICK)
        assert wait_for_flow_run(api, healthy, timeout=120)["state"]["type"] == "COMPLETED"
        # The worker's machine dies mid-training: every process in its clone is killed.
        edit_params(team.worker, train={"epochs": 3})
        dead = start_run(team, api, 'targets=["train"]', "pull=false", "push=false")
        deadline = time.monotonic() + 120
        while not (team.worker / CHECKPOINT).exists():  # epoch 1 done
            assert time.monotonic() < deadline, (tmp_path / "dying.log").read_text()
            time.sleep(0.2)
        for process in processes_in(team.worker):
            process.kill()
    assert prefect_api(api, f"/flow_runs/{dead}")["state"]["type"] == "RUNNING"
    state = wait_for_flow_run(api, dead, timeout=90)["state"]
    assert state["type"] == "CRASHED", state
    assert "No heartbeat" in state["message"]
    # A run that ended is never marked Crashed, though its last heartbeat is older still.
    assert prefect_api(api, f"/flow_runs/{healthy}")["state"]["type"] == "COMPLETED"

    # Run again (here `dvc repro train` in the worker's clone, as a new worker's run would):
    # training resumes from the dead run's checkpoint.
    rerun = dvc(team.worker, "repro", "train")
    assert f"resuming from {CHECKPOINT}: epoch " in rerun.stdout + rerun.stderr
    assert not (team.worker / CHECKPOINT).exists()
