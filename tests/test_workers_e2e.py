"""Prefect workers end to end (docs/workers.md): prefect.yaml deployed with `prefect deploy` from
one clone, its runs picked up by `prefect worker start` in another clone (a worker machine's
checkout), which pushes to the shared DVC remote what the first clone then pulls."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .helpers.git import commit_all, fresh_clone
from .helpers.prefect import prefect_api, prefect_worker, processes_in, wait_for_flow_run
from .helpers.tools import VENV_BIN, dvc, run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POOL = "fashion-mnist"  # prefect.yaml's work pool
DEPLOYMENT = "fashion-mnist-pipeline/worker"
STAGES = ["validate", "download", "preprocess", "train", "evaluate", "export"]
CARD = "models/model_card.json"


def prefect(repo: Path, api: str, *args: str) -> subprocess.CompletedProcess:
    """The prefect CLI in `repo`, as a user with PREFECT_API_URL set; never prompts."""
    command = [str(VENV_BIN / "prefect"), "--no-prompt", *args]
    return run(command, repo, tool_env(PREFECT_API_URL=api))


def lock_md5(repo: Path, out: str) -> str:
    """The md5 dvc.lock records for the file out `out`."""
    for stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values():
        for entry in stage.get("outs", []):
            if entry["path"] == out:
                return entry["md5"]
    raise AssertionError(f"{out} not in dvc.lock")


@dataclass
class Team:
    remote: Path  # the shared DVC remote (a folder)
    worker: Path  # the worker machine's clone, after `dvc pull`
    submitter: Path  # a clone with no outs, which deploys and starts runs


def deployed(repo: Path, api: str, tmp_path: Path) -> Team:
    """The reproduced `repo` committed with a folder remote and pushed; a worker's clone that has
    pulled it; the work pool created and prefect.yaml deployed from a third clone, with no outs."""
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    commit_all(repo, "a reproduced pipeline, its remote and prefect.yaml")
    dvc(repo, "push")
    worker = fresh_clone(repo, tmp_path / "worker")
    dvc(worker, "pull")
    submitter = fresh_clone(repo, tmp_path / "submitter")
    prefect(submitter, api, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    result = prefect(submitter, api, "deploy", "--all")
    assert DEPLOYMENT in result.stdout, result.stdout
    return Team(remote, worker, submitter)


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


def test_a_worker_in_its_own_clone_runs_the_deployment_and_pushes_its_outs(
    pipeline_copy: Path, prefect_server: str, tmp_path: Path
) -> None:
    api = prefect_server
    team = deployed(pipeline_copy, api, tmp_path)
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
    md5 = lock_md5(pipeline_copy, CARD)
    lost = team.remote / "files" / "md5" / md5[:2] / md5[2:]
    lost.unlink()

    log = tmp_path / "worker.log"
    with prefect_worker(team.worker, api, POOL, log):
        run_id = start_run(team, api, "pull=true", "push=true")
        flow_run = wait_for_flow_run(api, run_id, timeout=180)
        assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], log.read_text())
        assert flow_run["work_pool_name"] == POOL
        assert task_states(api, run_id) == dict.fromkeys(STAGES, "Cached")
    assert processes_in(team.worker) == []
    assert lost.is_file(), "the worker's push did not restore the model card"

    dvc(team.submitter, "pull")
    assert "up to date" in dvc(team.submitter, "status").stdout
    assert "in sync" in dvc(team.submitter, "status", "-c").stdout
    assert (team.submitter / CARD).read_bytes() == (pipeline_copy / CARD).read_bytes()
