"""End to end: `python -m flows.sweep` runs real DVC experiments against a real Prefect server."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from .helpers.prefect import prefect_api
from .helpers.tools import dvc, run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COLUMNS_AFTER_PARAMS = ["test_accuracy", "test_loss", "val_accuracy", "seconds", "error"]


def run_sweep(repo: Path, api: str, *args: str) -> tuple[Any, str]:
    result = run(
        ["python", "-m", "flows.sweep", *args], repo, tool_env(PREFECT_API_URL=api), check=False
    )
    match = re.search(r"flow run id ([0-9a-f-]{36})", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return result, match.group(1)


def experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """Each experiment `dvc exp show --json` lists, by name."""
    found = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def workspace_state(repo: Path) -> dict[str, str]:
    """sha256 of params.yaml, dvc.lock and every file of the stages an experiment reruns."""
    files = [repo / "params.yaml", repo / "dvc.lock"]
    for folder in ("models", "reports"):
        files += sorted(p for p in (repo / folder).rglob("*") if p.is_file())
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leaderboard_csv(repo: Path, name: str) -> list[dict[str, str]]:
    with open(repo / "sweeps" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def artifact_rows(api: str, run_id: str) -> list[dict[str, Any]]:
    artifacts = prefect_api(api, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    [table] = [a for a in artifacts if a["key"] == "sweep-leaderboard"]
    return json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]


def task_runs(api: str, run_id: str) -> dict[str, str]:
    runs = prefect_api(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"]: r["state"]["name"] for r in runs}


def metric(data: dict[str, Any], path: str, *keys: str) -> float:
    node = data["metrics"][path]["data"]
    for key in keys:
        node = node[key]
    return node


def test_a_two_point_sweep(pipeline_copy: Path, prefect_server: str) -> None:
    repo = pipeline_copy
    before, status_before = workspace_state(repo), run(["git", "status"], repo, tool_env()).stdout
    result, run_id = run_sweep(
        repo,
        prefect_server,
        "--set",
        "train.learning_rate=0.05,0.1",
        "--set",
        # The workspace's batch: lr 0.1 is then the params the pipeline already ran, which DVC's
        # run-cache restores in seconds (and CI time stays small).
        "train.batch_size=128",
        "--name",
        "lr",
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # Every combination ran as a DVC experiment, each recorded with its params and metrics.
    recorded = experiments(repo)
    assert {"lr-1", "lr-2"} <= set(recorded)
    show = dvc(repo, "exp", "show", "--md").stdout
    assert "[lr-1]" in show and "[lr-2]" in show
    rows = leaderboard_csv(repo, "lr")
    assert list(rows[0]) == [
        "rank",
        "experiment",
        "status",
        "train.learning_rate",
        "train.batch_size",
        *COLUMNS_AFTER_PARAMS,
    ]
    assert sorted(row["experiment"] for row in rows) == ["lr-1", "lr-2"]
    for row in rows:
        data = recorded[row["experiment"]]
        train = data["params"]["params.yaml"]["data"]["train"]
        assert train["epochs"] == 1  # the workspace's uncommitted small params came along
        assert float(row["train.learning_rate"]) == train["learning_rate"]
        assert int(row["train.batch_size"]) == train["batch_size"] == 128
        assert row["status"] == "ok" and row["error"] == ""
        evaluate = "reports/evaluate/metrics.json"
        assert float(row["test_accuracy"]) == metric(data, evaluate, "accuracy")
        assert float(row["test_loss"]) == metric(data, evaluate, "loss")
        val = metric(data, "reports/train/metrics.json", "val", "accuracy")
        assert float(row["val_accuracy"]) == val
        assert float(row["seconds"]) > 0
    assert [
        recorded[name]["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        for name in ("lr-1", "lr-2")
    ] == [0.05, 0.1]

    # Best first, named with the command that takes it.
    accuracies = [float(row["test_accuracy"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert [row["rank"] for row in rows] == ["1", "2"]
    best = rows[0]["experiment"]
    assert (
        f"best: {best} (test accuracy {float(rows[0]['test_accuracy']):.4f}); take it into the "
        f"workspace with: dvc exp apply {best}"
    ) in result.stdout.splitlines()

    # The same table in Prefect, and a task run per combination, named after it.
    published = artifact_rows(prefect_server, run_id)
    assert [{k: str(v) for k, v in row.items()} for row in published] == rows
    assert task_runs(prefect_server, run_id) == {
        "train.learning_rate=0.05 train.batch_size=128": "Completed",
        "train.learning_rate=0.1 train.batch_size=128": "Completed",
    }
    assert prefect_api(prefect_server, f"/flow_runs/{run_id}")["state"]["type"] == "COMPLETED"

    # The workspace is as it was: params, lock, outs; the leaderboard is git-ignored.
    assert workspace_state(repo) == before
    assert run(["git", "status"], repo, tool_env()).stdout == status_before


def test_a_failed_experiment_is_reported_and_the_others_run(
    pipeline_copy: Path, prefect_server: str
) -> None:
    # mps never exists on Linux: the first experiment fails in train; `auto` is the workspace's
    # own value, so the second one reruns nothing and takes seconds.
    result, run_id = run_sweep(
        pipeline_copy, prefect_server, "--set", "device=mps,auto", "--name", "dev"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    error = "train: device = 'mps': MPS is not available on this machine"
    assert f"error: 1 of 2 experiments failed (dev-1: {error})" in result.stderr.splitlines()
    rows = leaderboard_csv(pipeline_copy, "dev")
    assert [(r["experiment"], r["status"], r["device"], r["error"]) for r in rows] == [
        ("dev-2", "ok", "auto", ""),
        ("dev-1", "failed", "mps", error),
    ]
    assert rows[1]["test_accuracy"] == ""
    assert "best: dev-2 " in result.stdout
    recorded = experiments(pipeline_copy)
    assert "dev-2" in recorded and "dev-1" not in recorded  # DVC keeps no failed --temp run
    assert task_runs(prefect_server, run_id) == {"device=mps": "Failed", "device=auto": "Completed"}
    assert prefect_api(prefect_server, f"/flow_runs/{run_id}")["state"]["type"] == "FAILED"
    assert [r["status"] for r in artifact_rows(prefect_server, run_id)] == ["ok", "failed"]
