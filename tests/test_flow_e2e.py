"""End to end: the Prefect flow against a real `prefect server`, sharing DVC's lock and cache."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .helpers.disk import read_only_view
from .helpers.prefect import prefect_api
from .helpers.repo import SMALL, clone_pipeline, copy_repo, edit_params
from .helpers.tools import VENV_BIN, dvc, run, stages_run, stop_session, tool_env

pytestmark = pytest.mark.e2e

STAGES = ["validate", "download", "preprocess", "train", "evaluate", "export"]


def run_flow(repo: Path, api: str, *args: str, check: bool = True, **env: str):
    result = run(
        ["python", "-m", "flows.pipeline", *args],
        repo,
        tool_env(PREFECT_API_URL=api, **env),
        check=check,
    )
    return result, flow_run_id(result.stdout + result.stderr)


def flow_run_id(output: str) -> str | None:
    match = re.search(r"flow run id ([0-9a-f-]{36})", output)
    return match.group(1) if match else None


def task_states(api: str, run_id: str) -> dict[str, str]:
    """Stage name -> state name of each task run of a flow run, read back through the API."""
    runs = prefect_api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}  # "train-a2f"


@pytest.fixture(scope="module")
def cached_flow_run(
    pipeline: tuple[Path, str], prefect_server: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The id of one flow run in a copy of the reproduced pipeline: every task cached. The cache
    test and the UI test read the same run, which neither changes."""
    repo = clone_pipeline(pipeline[0], tmp_path_factory.mktemp("cached") / "repo")
    result, run_id = run_flow(repo, prefect_server)
    assert run_id, result.stderr
    return run_id


def test_flow_after_repro_caches_every_stage(cached_flow_run: str, prefect_server: str) -> None:
    run_id = cached_flow_run
    assert task_states(prefect_server, run_id) == dict.fromkeys(STAGES, "Cached")
    flow_run = prefect_api(prefect_server, f"/flow_runs/{run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert any(t.startswith("params:") for t in flow_run["tags"])
    assert any(t.startswith("git:") for t in flow_run["tags"])


def test_changed_param_reruns_the_same_stages_from_either_door(
    pipeline_copy: Path, prefect_server: str, tmp_path: Path
) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(pipeline_copy, twin, symlinks=True)
    for repo in (pipeline_copy, twin):
        edit_params(repo, train={"learning_rate": 0.002})

    result, run_id = run_flow(pipeline_copy, prefect_server)
    states = task_states(prefect_server, run_id)
    rerun = ["validate", "train", "evaluate", "export"]
    assert [s for s in STAGES if states[s] != "Cached"] == rerun
    assert {states[s] for s in rerun} == {"Completed"}
    assert stages_run(dvc(twin, "repro").stdout) == rerun

    # One truth: the same lock from either door, and each door finds the other's work done.
    assert (pipeline_copy / "dvc.lock").read_bytes() == (twin / "dvc.lock").read_bytes()
    assert stages_run(dvc(pipeline_copy, "repro").stdout) == []
    assert "up to date" in dvc(pipeline_copy, "status").stdout

    artifacts = prefect_api(
        prefect_server, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}}
    )
    keys = {a["key"] for a in artifacts}
    assert {"test-metrics", "per-class-metrics", "pipeline-summary"} <= keys
    metrics = next(a for a in artifacts if a["key"] == "test-metrics")
    assert "accuracy" in str(metrics["data"])

    # The device and thread choices reach the UI with the rest of the stage's log.
    this_run = {"logs": {"flow_run_id": {"any_": [run_id]}}}
    logs = prefect_api(prefect_server, "/logs/filter", this_run)
    messages = "\n".join(entry["message"] for entry in logs)
    assert re.search(r"^device: (cpu|cuda|mps)", messages, re.M), messages
    assert re.search(r"^torch threads: \d+$", messages, re.M), messages


def test_flow_from_scratch_leaves_the_lock_dvc_repro_leaves(
    pipeline: tuple[Path, str], prefect_server: str, tmp_path: Path, real_mirror: Path
) -> None:
    repo = copy_repo(tmp_path / "fresh")
    edit_params(repo, **SMALL)
    result, run_id = run_flow(repo, prefect_server, FMNIST_MIRROR=str(real_mirror))
    assert set(task_states(prefect_server, run_id).values()) == {"Completed"}
    assert (repo / "dvc.lock").read_bytes() == (pipeline[0] / "dvc.lock").read_bytes()
    assert stages_run(dvc(repo, "repro").stdout) == []


def test_targets_and_force(pipeline_copy: Path, prefect_server: str, real_mirror: Path) -> None:
    _, run_id = run_flow(
        pipeline_copy,
        prefect_server,
        "--target",
        "preprocess",
        "--force",
        FMNIST_MIRROR=str(real_mirror),
    )
    assert task_states(prefect_server, run_id) == {
        "download": "Completed",
        "preprocess": "Completed",
    }
    assert stages_run(dvc(pipeline_copy, "repro").stdout) == []


def test_flow_and_dvc_repro_never_interleave(pipeline_copy: Path, prefect_server: str) -> None:
    edit_params(pipeline_copy, train={"learning_rate": 0.003, "epochs": 3})
    env = tool_env(PREFECT_API_URL=prefect_server)
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=pipeline_copy, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert repro.stdout is not None
        for line in repro.stdout:  # wait until dvc repro holds its lock and is training
            if "Running stage 'train'" in line:
                break
        started = time.monotonic()
        busy, _ = run_flow(pipeline_copy, prefect_server, check=False)
        assert busy.returncode != 0
        assert "pipeline busy" in busy.stderr
        assert time.monotonic() - started < 60
        waited, run_id = run_flow(pipeline_copy, prefect_server, "--wait-for-lock")
    finally:
        repro.wait(timeout=300)
    assert repro.returncode == 0
    # The waiting flow ran after dvc repro and found everything done.
    assert task_states(prefect_server, run_id) == dict.fromkeys(STAGES, "Cached")
    assert "up to date" in dvc(pipeline_copy, "status").stdout


def test_dvc_repro_refuses_while_the_flow_runs(pipeline_copy: Path, prefect_server: str) -> None:
    edit_params(pipeline_copy, train={"learning_rate": 0.004, "epochs": 3})
    flow = subprocess.Popen(
        ["python", "-m", "flows.pipeline"],
        cwd=pipeline_copy,
        env=tool_env(PREFECT_API_URL=prefect_server),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert flow.stdout is not None
        for line in flow.stdout:
            if "training 3 epochs" in line:
                break
        busy = dvc(pipeline_copy, "repro", check=False)
        assert busy.returncode != 0
        assert "Unable to acquire lock" in busy.stderr
    finally:
        flow.wait(timeout=300)
    assert flow.returncode == 0
    assert "up to date" in dvc(pipeline_copy, "status").stdout


def test_serve_registers_the_schedule_and_runs_on_demand(
    pipeline_copy: Path, prefect_server: str
) -> None:
    serve = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "flows.serve", "--cron", "0 3 * * *"],
        cwd=pipeline_copy,
        env=tool_env(PREFECT_API_URL=prefect_server),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deployment = None
        deadline = time.monotonic() + 90
        while deployment is None and time.monotonic() < deadline:
            try:
                deployment = prefect_api(
                    prefect_server, "/deployments/name/fashion-mnist-pipeline/scheduled"
                )
            except OSError:
                assert serve.poll() is None, "flows.serve exited"
                time.sleep(1)
        assert deployment is not None
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]

        flow_run = prefect_api(
            prefect_server, f"/deployments/{deployment['id']}/create_flow_run", {}
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            state = prefect_api(prefect_server, f"/flow_runs/{flow_run['id']}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        assert state["type"] == "COMPLETED", state
        assert task_states(prefect_server, flow_run["id"]) == dict.fromkeys(STAGES, "Cached")
    finally:
        stop_session(serve)


def test_serve_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run(
        ["python", "-m", "flows.serve"],
        tmp_path,
        tool_env(PREFECT_API_URL="http://127.0.0.1:9/api"),
        check=False,
    )
    assert result.returncode != 0
    assert "prefect server start --host 127.0.0.1" in result.stderr
    assert time.monotonic() - started < 30


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_ui_shows_every_task_run(cached_flow_run: str, prefect_server: str, tmp_path: Path) -> None:
    run_id = cached_flow_run
    ui = prefect_server.removesuffix("/api")
    url = f"{ui}/runs/flow-run/{run_id}?tab=Task%20Runs"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=30000",
        "--window-size=1400,1000",
    ]
    shot = Path(os.environ.get("UI_SCREENSHOT_DIR", tmp_path)) / "flow-run.png"
    run(
        [CHROMIUM, *flags, f"--user-data-dir={tmp_path / 'shot'}", f"--screenshot={shot}", url],
        tmp_path,
        tool_env(),
    )
    dom = run(
        [CHROMIUM, *flags, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom", url],
        tmp_path,
        tool_env(),
    ).stdout
    assert shot.stat().st_size > 10_000
    for stage in STAGES:
        assert re.search(rf"\b{stage}-[0-9a-f]{{3}}\b", dom), f"{stage} task run not on the page"


def test_a_read_only_checkout_is_named_without_a_traceback(
    pipeline_copy: Path, prefect_server: str, tmp_path: Path
) -> None:
    edit_params(pipeline_copy, train={"learning_rate": 0.05})  # something to run
    with read_only_view(pipeline_copy, tmp_path / "view") as view:
        started = time.monotonic()
        result, _ = run_flow(view, prefect_server, check=False)
        seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, result.stderr
    assert (
        f"{view}/.dvc/tmp/lock: cannot write into {view}/.dvc/tmp/ (Read-only file system)"
        in (errors[-1])
    )
    assert "Traceback" not in result.stderr
    assert seconds < 60, seconds
