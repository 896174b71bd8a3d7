"""Canary: the DVC names flows/dvc_runner.py and flows/dvc_lock.py rely on still exist and
behave as they expect.

A DVC upgrade that changes one fails here, in a second or two, naming the function, instead of
making the flow mislabel stages or write a dvc.lock that `dvc repro` would not.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from dvc.dvcfile import ProjectFile
from dvc.lock import LockError
from dvc.output import Output
from dvc.repo import Repo, lock_repo
from dvc.repo.reproduce import _reproduce_stage
from dvc.repo.stage import StageLoad
from dvc.rwlock import rwlock
from dvc.stage import Stage
from dvc.stage.cache import StageCache, _can_hash
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps, to_hydra_overrides

from flows.dvc_lock import hold_pipeline
from flows.dvc_runner import run_in_process

# name -> (the callable, the parameters the runner passes it: its first ones, in order)
SIGNATURES: dict[str, tuple[Any, list[str]]] = {
    "dvc.rwlock.rwlock": (rwlock, ["tmp_dir", "fs", "cmd", "read", "write", "hardlink"]),
    "dvc.repo.lock_repo": (lock_repo, ["repo"]),
    "dvc.repo.reproduce._reproduce_stage": (_reproduce_stage, ["stage", "kwargs"]),
    "dvc.stage.Stage.changed": (Stage.changed, ["self", "allow_missing", "upstream"]),
    "dvc.stage.Stage.remove_outs": (Stage.remove_outs, ["self", "ignore_remove", "force"]),
    "dvc.stage.Stage.save": (Stage.save, ["self", "allow_missing", "run_cache"]),
    "dvc.stage.Stage.save_deps": (Stage.save_deps, ["self"]),
    "dvc.stage.cache.StageCache.restore": (StageCache.restore, ["self", "stage"]),
    # stages/outs.py: a failed stage's outs, put back as dvc.lock records them
    "dvc.output.Output.checkout": (Output.checkout, ["self", "force"]),
    "dvc.repo.stage.StageLoad.load_one": (StageLoad.load_one, ["self", "path", "name"]),
    # flows/sweep.py expands and applies --set as `dvc exp run -S` does
    "dvc.utils.hydra.apply_overrides": (apply_overrides, ["path", "overrides"]),
    "dvc.utils.hydra.get_hydra_sweeps": (get_hydra_sweeps, ["path_overrides"]),
    "dvc.utils.hydra.to_hydra_overrides": (to_hydra_overrides, ["path_overrides"]),
    "dvc.stage.Stage.commit": (Stage.commit, ["self", "allow_missing"]),
    # Stage.dump(**kwargs) hands update_pipeline on to the dvc.yaml file's dump.
    "dvc.dvcfile.ProjectFile.dump": (ProjectFile.dump, ["self", "stage", "update_pipeline"]),
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_dvc_function_takes_the_arguments_the_runner_passes(name: str) -> None:
    function, expected = SIGNATURES[name]
    found = list(inspect.signature(function).parameters)
    assert found[: len(expected)] == expected, f"{name} changed: its parameters are now {found}"


def test_repo_takes_wait_for_lock() -> None:
    found = inspect.signature(Repo.__init__).parameters
    assert "_wait_for_lock" in found, f"dvc.repo.Repo() changed: its parameters are now {found}"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # DVC finds dvc.yaml from the working folder


COPY_UPPER = "open('out.txt', 'w').write(open('in.txt').read().upper())"


def toy_repo(root: Path) -> Repo:
    """A DVC repo (no git) with one stage: `python -c ...` writing an out."""
    root.mkdir()
    os.chdir(root)
    Repo.init(str(root), no_scm=True).close()
    (root / "in.txt").write_text("input\n")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  copy:\n"
        f'    cmd: {sys.executable} -c "{COPY_UPPER}"\n'
        "    deps: [in.txt]\n"
        "    outs: [out.txt]\n"
    )
    return Repo(str(root))


def test_repro_fn_hook_gets_each_stage_with_upstream_and_force(tmp_path: Path) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def spy(stage: Stage, **kwargs: Any) -> None:
        calls.append((stage.name, kwargs))

    with toy_repo(tmp_path / "repo") as repo:
        repo.reproduce(repro_fn=spy)
    assert [name for name, _ in calls] == ["copy"], "Repo.reproduce no longer calls repro_fn"
    assert {"upstream", "force"} <= set(calls[0][1]), (
        f"Repo.reproduce calls repro_fn with {sorted(calls[0][1])}, not upstream and force"
    )


def test_in_process_steps_leave_the_lock_dvc_repro_leaves(tmp_path: Path) -> None:
    with toy_repo(tmp_path / "by_dvc") as repo:
        repo.reproduce()
    with toy_repo(tmp_path / "by_hook") as repo, hold_pipeline(repo, wait=False):
        (stage,) = repo.index.stages
        assert _can_hash(stage), "DVC's run cache no longer takes this stage: see run_in_process"
        assert stage.changed(False, None), "Stage.changed: a new stage is not seen as changed"
        dvc_yaml = (tmp_path / "by_hook" / "dvc.yaml").read_text()
        out = Path(repo.root_dir) / "out.txt"
        ran = run_in_process(stage, lambda: out.write_text("INPUT\n"), force=False, no_commit=False)
        assert ran, "run_in_process restored a stage that never ran from DVC's run-cache"
        assert not stage.changed(False, None), "Stage.save/commit/dump left the stage changed"
        assert (tmp_path / "by_hook" / "dvc.yaml").read_text() == dvc_yaml, "dump rewrote dvc.yaml"
    by_dvc = (tmp_path / "by_dvc" / "dvc.lock").read_text()
    assert (tmp_path / "by_hook" / "dvc.lock").read_text() == by_dvc


def test_going_back_to_inputs_that_ran_restores_from_the_run_cache(tmp_path: Path) -> None:
    ran: list[str] = []

    def upper() -> None:
        ran.append(Path("in.txt").read_text())
        Path("out.txt").write_text(Path("in.txt").read_text().upper())

    with toy_repo(tmp_path / "repo") as repo, hold_pipeline(repo, wait=False):
        for text in ("input\n", "other\n", "input\n"):
            Path("in.txt").write_text(text)
            repo._reset()
            (stage,) = repo.index.stages
            run_in_process(stage, upper, force=False, no_commit=False)
    assert ran == ["input\n", "other\n"], "the third run did not come from DVC's run-cache"
    assert Path("out.txt").read_text() == "INPUT\n"


def test_dvcs_own_step_runs_under_the_flows_locks(tmp_path: Path) -> None:
    # DVC's per-stage path locks, taken in this process under the same command line, re-enter.
    with toy_repo(tmp_path / "repo") as repo, hold_pipeline(repo, wait=False):
        (stage,) = repo.index.stages
        assert _reproduce_stage(stage, upstream=[], force=False) is stage
    assert (tmp_path / "repo" / "out.txt").read_text() == "INPUT\n"


def test_path_locks_refuse_a_second_holder(tmp_path: Path) -> None:
    with toy_repo(tmp_path / "repo") as repo:
        out = [repo.root_dir + "/out.txt"]
        with rwlock(repo.tmp_dir, repo.fs, "first", [], out, False):
            second = rwlock(repo.tmp_dir, repo.fs, "second", [], out, False)
            with pytest.raises(LockError, match="is busy"), second:
                pass
            # DVC's own path locks in the same process, under the same command, do not block.
            with rwlock(repo.tmp_dir, repo.fs, "first", out, out, False):
                pass


def test_lock_repo_takes_the_repo_lock(tmp_path: Path) -> None:
    # That a second holder is refused (after DVC's 3 s of retries) is test_flow_e2e.py's part.
    with toy_repo(tmp_path / "repo") as repo:
        with lock_repo(repo):
            assert repo.lock.is_locked, "dvc.repo.lock_repo no longer takes the repo lock"
        assert not repo.lock.is_locked, "dvc.repo.lock_repo no longer lets go of it"
