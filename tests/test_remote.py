"""flows/remote.py on a toy DVC project: the default remote, push, pull, what a remote lacks
(the end-to-end runs, through the flow and S3, are in test_remote_e2e.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dvc.repo import Repo

from flows import remote

from .helpers.tools import dvc


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DVC project (no git) tracking one file, `data.txt`."""
    root = tmp_path / "project"
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    (root / "data.txt").write_text("forty-two\n")
    dvc(root, "add", "data.txt")
    return root


def forget_locally(root: Path) -> None:
    (root / "data.txt").unlink()
    shutil.rmtree(root / ".dvc" / "cache")


def test_without_a_default_remote_the_error_names_the_command(project: Path) -> None:
    with pytest.raises(remote.RemoteError, match=r"`dvc remote add -d <name> <url>`"):
        remote.require_remote(project)
    with pytest.raises(remote.RemoteError, match="no default DVC remote"):
        remote.push(project)


def test_push_then_pull_brings_the_file_back(project: Path, tmp_path: Path) -> None:
    dvc(project, "remote", "add", "-d", "shelf", str(tmp_path / "shelf"))
    pushed = remote.push(project)
    assert (pushed.remote, pushed.files) == ("shelf", 1)
    forget_locally(project)
    pulled = remote.pull(project)
    assert (pulled.files, pulled.missing) == (1, [])
    assert (project / "data.txt").read_text() == "forty-two\n"
    assert pulled.describe("pulled") == f"pulled 1 file(s), remote `shelf` ({tmp_path / 'shelf'})"


def test_what_the_remote_lacks_is_named(project: Path, tmp_path: Path) -> None:
    dvc(project, "remote", "add", "-d", "shelf", str(tmp_path / "shelf"))
    forget_locally(project)  # never pushed: the remote is empty
    pulled = remote.pull(project)
    assert pulled.missing == ["data.txt"]
    assert pulled.describe("pulled").endswith("not on the remote, so rerun: data.txt")
