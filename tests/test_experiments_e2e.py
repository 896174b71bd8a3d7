"""End to end: DVC experiments (`dvc exp run`, show, diff, apply, branch) on the real pipeline."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers.cache import cache_object
from .helpers.tools import dvc, stages_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WEIGHTS = "models/train/model_weights.pth"
RELEASED = "models/model_weights.pth"


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout


def experiment(repo: Path, name: str) -> dict[str, Any]:
    """What `dvc exp show --json` records for the experiment `name`."""
    for baseline in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                if rev["name"] == name:
                    return rev["data"]
    raise AssertionError(f"dvc exp show does not list {name}")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def learning_rate(params_text: str) -> float:
    return yaml.safe_load(params_text)["train"]["learning_rate"]


def test_an_experiment_runs_shows_diffs_applies_and_branches(pipeline_copy: Path) -> None:
    repo = pipeline_copy
    # The baseline: the reproduced small pipeline, committed, so that a diff shows only the exp.
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "small pipeline")
    baseline_weights = (repo / WEIGHTS).read_bytes()

    ran = dvc(repo, "exp", "run", "-S", "train.learning_rate=0.05", "--name", "lr005")
    assert stages_run(ran.stdout) == ["validate", "train", "evaluate", "export"]
    assert "Ran experiment(s): lr005" in ran.stdout

    # show: the exp with its param and the metrics of both metrics files.
    data = experiment(repo, "lr005")
    assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.05
    test_metrics = data["metrics"]["reports/evaluate/metrics.json"]["data"]
    assert 0.5 < test_metrics["accuracy"] < 1 and test_metrics["loss"] > 0
    assert 0.5 < data["metrics"]["reports/train/metrics.json"]["data"]["val"]["accuracy"] < 1
    markdown = dvc(repo, "exp", "show", "--md").stdout
    row = next(line for line in markdown.splitlines() if "[lr005]" in line)
    assert "| 0.05 " in row and f"| {test_metrics['accuracy']} " in row

    # diff: the learning rate is the only param that changed; the test accuracy moved with it.
    diff = json.loads(dvc(repo, "exp", "diff", "HEAD", "lr005", "--json").stdout)
    assert diff["params"] == {
        "params.yaml": {"train.learning_rate": {"old": 0.1, "new": 0.05, "diff": -0.05}}
    }
    accuracy_diff = diff["metrics"]["reports/evaluate/metrics.json"]["accuracy"]
    assert accuracy_diff["new"] == test_metrics["accuracy"]

    # Back to the baseline, then apply: the exp's params.yaml and outs land in the workspace.
    git(repo, "checkout", "--", "params.yaml", "dvc.lock")
    dvc(repo, "checkout")
    assert (repo / WEIGHTS).read_bytes() == baseline_weights
    dvc(repo, "exp", "apply", "lr005")
    assert learning_rate((repo / "params.yaml").read_text()) == 0.05
    recorded = data["outs"][WEIGHTS]["hash"]
    assert md5(repo / WEIGHTS) == md5(repo / RELEASED) == recorded
    assert (repo / WEIGHTS).read_bytes() == cache_object(repo, recorded).read_bytes()
    assert (repo / WEIGHTS).read_bytes() != baseline_weights
    assert json.loads((repo / "reports/evaluate/metrics.json").read_text()) == test_metrics
    assert "up to date" in dvc(repo, "status").stdout

    # branch: a git branch whose params.yaml and dvc.lock are the exp's.
    dvc(repo, "exp", "branch", "lr005", "lr-005")
    assert learning_rate(git(repo, "show", "lr-005:params.yaml")) == 0.05
    lock = yaml.safe_load(git(repo, "show", "lr-005:dvc.lock"))
    train_outs = {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}
    assert train_outs[WEIGHTS] == recorded

    # The run-cache: the same experiment again, from the baseline, restores instead of training.
    git(repo, "checkout", "--", "params.yaml", "dvc.lock")
    dvc(repo, "checkout")
    again = dvc(repo, "exp", "run", "-S", "train.learning_rate=0.05", "--name", "lr005-again")
    assert "Stage 'train' is cached - skipping run, checking out outputs" in (
        again.stdout + again.stderr
    )
    assert md5(repo / WEIGHTS) == recorded
