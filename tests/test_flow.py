"""The flow's stage bookkeeping, without a Prefect server (the end-to-end runs are in
test_flow_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace

import dvc.stage.run as dvc_run
import pytest

from flows.pipeline import RunLog, in_process_commands, make_repro_fn
from stages.config import Params


def test_a_stage_run_by_subprocess_counts_as_run_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    subprocess_runs: list[str] = []
    monkeypatch.setattr(
        dvc_run, "cmd_run", lambda stage, dry=False, run_env=None: subprocess_runs.append(stage.cmd)
    )
    shell_stage = SimpleNamespace(
        name="report",
        cmd="echo done > report.txt",
        reproduce=lambda **_: shell_stage,
        dump=lambda update_pipeline: None,
    )
    log = RunLog()
    with in_process_commands(Params(), log):
        dvc_run.cmd_run(shell_stage)
        dvc_run.cmd_run(shell_stage, dry=True)  # `dvc repro --dry` runs nothing
        assert log.ran == {"report"}
        make_repro_fn(log)(shell_stage)
    assert subprocess_runs == [shell_stage.cmd, shell_stage.cmd]
    assert log.stages["report"].status == "ran"
