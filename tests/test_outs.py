"""A stage that DVC runs and that fails puts back the outs DVC removed (stages/outs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dvc.repo import Repo

from stages.outs import restoring_outs

from .helpers.tools import dvc


def recorded_repo(root: Path) -> Path:
    """A DVC repo (no git) whose stage `upper` has run once: out.txt is in dvc.lock and cache."""
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    (root / "in.txt").write_text("input\n")
    script = "open('out.txt', 'w').write(open('in.txt').read().upper())"
    (root / "dvc.yaml").write_text(
        f'stages:\n  upper:\n    cmd: {sys.executable} -c "{script}"\n'
        "    deps: [in.txt]\n    outs: [out.txt]\n"
    )
    dvc(root, "repro")
    return root


def fail_inside(monkeypatch: pytest.MonkeyPatch, root: Path | None) -> None:
    if root is None:
        monkeypatch.delenv("DVC_ROOT", raising=False)
    else:
        monkeypatch.setenv("DVC_ROOT", str(root))
    with pytest.raises(RuntimeError), restoring_outs("upper"):
        raise RuntimeError("the stage failed")


def test_a_failed_stage_under_dvc_gets_its_outs_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = recorded_repo(tmp_path / "repo")
    (root / "out.txt").unlink()  # as DVC removes it before the command runs
    fail_inside(monkeypatch, root)
    assert (root / "out.txt").read_text() == "INPUT\n"
    assert "up to date" in dvc(root, "status").stdout


def test_an_out_replaced_before_the_failure_is_put_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = recorded_repo(tmp_path / "repo")
    (root / "out.txt").unlink()
    (root / "out.txt").write_text("half a run\n")
    fail_inside(monkeypatch, root)
    assert (root / "out.txt").read_text() == "INPUT\n"


def test_run_by_hand_nothing_is_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = recorded_repo(tmp_path / "repo")
    (root / "out.txt").unlink()
    monkeypatch.chdir(root)
    fail_inside(monkeypatch, None)
    assert not (root / "out.txt").exists()


def test_an_out_missing_from_the_cache_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = recorded_repo(tmp_path / "repo")
    (root / "out.txt").unlink()
    for cached in (root / ".dvc" / "cache").rglob("*"):
        if cached.is_file():
            cached.unlink()
    fail_inside(monkeypatch, root)
    assert "out.txt not in the DVC cache, so not put back: `dvc pull` or `dvc repro`" in caplog.text
