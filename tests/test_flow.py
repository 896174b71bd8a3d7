"""The flow's DVC runner without a Prefect server: which stages it runs in process, and what it
records (the end-to-end runs are in test_flow_e2e.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.repo import Repo, lock_repo

import flows.dvc_runner as runner
from stages.errors import StageError
from stages.train import train

from .helpers.repo import copy_repo
from .helpers.tools import REPO, run, tool_env

OUTS = "    outs:\n      - {}\n"


def repo_with(root: Path, stages: str, monkeypatch: pytest.MonkeyPatch) -> Repo:
    root.mkdir()
    monkeypatch.chdir(root)
    Repo.init(str(root), no_scm=True).close()
    (root / "dvc.yaml").write_text(f"stages:\n{stages}")
    return Repo(str(root))


def only_stage(repo: Repo) -> Any:
    (stage,) = repo.index.stages
    return stage


def test_a_stage_module_command_maps_to_its_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = "  train:\n    cmd: python -m stages.train\n" + OUTS.format("w.pth")
    with repo_with(tmp_path / "repo", stage, monkeypatch) as repo:
        name = runner.in_process_name(only_stage(repo))
        assert name == "train"
        assert runner.stage_task(only_stage(repo), name) is train


@pytest.mark.parametrize(
    "stage",
    [
        "  shout:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n",
        # DVC only checks a frozen stage's outs; its own step does that.
        "  train:\n    cmd: python -m stages.train\n    frozen: true\n" + OUTS.format("w.pth"),
    ],
    ids=["other-command", "frozen"],
)
def test_other_stages_take_dvcs_own_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    with repo_with(tmp_path / "repo", stage, monkeypatch) as repo:
        assert runner.in_process_name(only_stage(repo)) is None


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("  errors:\n    cmd: python -m stages.errors\n", "defines no Prefect task `errors`"),
    ],
)
def test_a_stage_the_flow_cannot_run_like_dvc_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, message: str
) -> None:
    with (
        repo_with(tmp_path / "repo", stage, monkeypatch) as repo,
        pytest.raises(StageError, match=message),
    ):
        stage = only_stage(repo)
        runner.stage_task(stage, runner.in_process_name(stage))


def test_record_says_what_dvc_did_with_a_command_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_ins: list[tuple[str, str]] = []
    monkeypatch.setattr(
        runner.stand_in,
        "with_options",
        lambda name: lambda state, note: stand_ins.append((name, state)),
    )
    stage = "  shout:\n    cmd: echo hi > out.txt\n" + OUTS.format("out.txt")
    record = runner.RunRecord()
    with repo_with(tmp_path / "repo", stage, monkeypatch) as repo, lock_repo(repo):
        repro_fn = runner.make_repro_fn(record)
        assert repro_fn(only_stage(repo)) is not None
        assert record.stages["shout"].status == "reproduced by DVC"
        assert (Path(repo.root_dir) / "out.txt").read_text() == "hi\n"
        assert (Path(repo.root_dir) / "dvc.lock").is_file()
        repo._reset()
        assert repro_fn(only_stage(repo)) is None
        assert record.stages["shout"].status == "up to date"
    assert stand_ins == [("shout", "Completed"), ("shout", "Cached")]
    assert record.device == runner.NO_DEVICE  # no stage ran in process
    assert os.getcwd() == str(tmp_path / "repo")


def test_a_second_run_is_busy_while_one_holds_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = "  shout:\n    cmd: echo hi > out.txt\n" + OUTS.format("out.txt")
    second = (
        "from dvc.repo import Repo; from flows.dvc_lock import hold_pipeline\n"
        "with Repo('.') as repo, hold_pipeline(repo, wait=False): pass"
    )
    with repo_with(tmp_path / "repo", stage, monkeypatch) as repo:
        with runner.hold_pipeline(repo, wait=False):
            busy = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True)
        free = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True)
    assert busy.returncode != 0
    assert "PipelineBusyError: pipeline busy" in busy.stderr, busy.stderr
    assert free.returncode == 0, free.stderr


def test_a_non_utf8_params_file_stops_the_flow_before_it_starts(tmp_path: Path) -> None:
    """One `error:` line naming the file and the byte, no Prefect run and no traceback."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "params.yaml").write_bytes((repo / "params.yaml").read_bytes() + b"# caf\xe9\n")
    result = run(["python", "-m", "flows.pipeline"], repo, tool_env(), check=False)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {repo}/params.yaml: not UTF-8 text (byte 0xe9"), error
    assert "Traceback" not in result.stderr
    assert "temporary server" not in result.stderr + result.stdout


def test_every_run_beats_often_enough_for_the_automation_that_crashes_silent_runs() -> None:
    """flows/automations.yaml marks a run Crashed after `within` s without a heartbeat: every
    way a run starts must beat several times in that window, and it must name this flow only."""
    from prefect.events.schemas.automations import AutomationCore

    from flows.cli import HEARTBEAT_ENV, beat_often
    from flows.pipeline import FLOW_NAME

    [raw] = yaml.safe_load((REPO / "flows" / "automations.yaml").read_text())["automations"]
    automation = AutomationCore.model_validate(raw)
    assert automation.trigger.match_related.root == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": FLOW_NAME,
    }
    assert automation.actions[0].state == "CRASHED" and not automation.actions[0].force
    name, beat = HEARTBEAT_ENV
    worker = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    assert worker["work_pool"]["job_variables"]["env"][name] == beat
    assert automation.trigger.within.total_seconds() >= 3 * int(beat)
    os.environ.pop(name, None)
    beat_often()
    assert os.environ.pop(name) == beat
    makefile = (REPO / "Makefile").read_text()
    assert f"AUTOMATION = {automation.name}\n" in makefile  # `make deploy` finds it by name
