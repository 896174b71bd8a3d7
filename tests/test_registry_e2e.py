"""The model registry end to end (docs/registry.md): two versions of the `dvc.yaml` artifact
registered with GTO and one assigned to prod, then fetched by version and by stage with
`dvc artifacts get` and `dvc.api.artifacts_show` on a machine that has only git and the remote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from dvc.api import artifacts_show

from .helpers.git import commit_all, fresh_clone, git, publish
from .helpers.repo import edit_params
from .helpers.tools import dvc, run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "fashion-mnist-mlp"
WEIGHTS = "models/model_weights.pth"
ONNX = "models/model.onnx"
# gto writes annotated tags as the git committer, and CI may have no git identity configured.
GTO_ENV = {"GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
# `dvc artifacts get` asks DVC Studio first wherever a Studio token is set; this keeps it local.


def gto(repo: Path, *args: str) -> str:
    return run(["gto", *args], repo, tool_env(**GTO_ENV)).stdout


class Release(NamedTuple):
    """A registered commit and the bytes its workspace held: what a fetch must give back."""

    commit: str
    weights: bytes
    onnx: bytes


def release(repo: Path, version: str) -> Release:
    """Commits the reproduced workspace and registers that commit as `version`."""
    commit_all(repo, f"model {version}")
    gto(repo, "register", NAME, "--version", version)
    commit = git(repo, "rev-parse", "HEAD").strip()
    return Release(commit, (repo / WEIGHTS).read_bytes(), (repo / ONNX).read_bytes())


def artifacts_get(cwd: Path, repo: str, out: Path, *selector: str) -> bytes:
    """`dvc artifacts get <repo> NAME <selector> -o <out>`, and the bytes it wrote."""
    dvc(cwd, "artifacts", "get", repo, NAME, *selector, "-o", str(out))
    return out.read_bytes()


def test_versions_and_a_stage_are_fetched_from_a_fresh_clone(
    pipeline_copy: Path, tmp_path: Path
) -> None:
    repo = pipeline_copy
    # `dvc artifacts get` reads the remote from .dvc/config at the artifact's commit.
    dvc(repo, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    v1 = release(repo, "v1.0.0")
    edit_params(repo, train={"learning_rate": 0.05})
    dvc(repo, "repro")
    v2 = release(repo, "v1.1.0")
    assert v1.weights != v2.weights, "the new learning rate should change the weights"
    # prod is the older version, so fetching by stage differs from fetching the latest.
    gto(repo, "assign", NAME, "--version", "v1.0.0", "--stage", "prod")
    # Every registered version's outs, not only the workspace's.
    assert "files pushed" in dvc(repo, "push", "--all-tags").stdout

    origin = publish(repo, tmp_path / "origin.git")
    clone = fresh_clone(origin, tmp_path / "clone")
    tags = set(git(clone, "tag", "--list").split())
    assert tags == {f"{NAME}@v1.0.0", f"{NAME}@v1.1.0", f"{NAME}#prod#1"}

    shown = json.loads(gto(clone, "show", "--json"))[NAME]
    assert (shown["version"], shown["stage"]) == ("v1.1.0", {"prod": "v1.0.0"})
    versions = json.loads(gto(clone, "show", NAME, "--json"))
    assert [v["version"] for v in versions] == ["v1.1.0", "v1.0.0"]
    assert [[s["stage"] for s in v["stages"]] for v in versions] == [[], ["prod"]]

    # The clone has no DVC cache: every byte below comes from the remote.
    got = tmp_path / "got"
    assert artifacts_get(clone, ".", got / "v1.0.0.pth", "--rev", "v1.0.0") == v1.weights
    assert artifacts_get(clone, ".", got / "v1.1.0.pth", "--rev", "v1.1.0") == v2.weights
    assert artifacts_get(clone, ".", got / "prod.pth", "--stage", "prod") == v1.weights
    # From only the git URL, with no clone at all: the latest version.
    latest = artifacts_get(tmp_path, f"file://{origin}", got / "latest.pth")
    assert latest == v2.weights
    # The other formats, by the version's tag.
    onnx = got / "prod.onnx"
    dvc(clone, "get", ".", ONNX, "--rev", f"{NAME}@v1.0.0", "-o", str(onnx))
    assert onnx.read_bytes() == v1.onnx
    assert not (clone / ".dvc" / "cache").exists()

    # The Python API: which commit and path each selector means.
    expected = {"v1.0.0": v1.commit, "prod": v1.commit, "latest": v2.commit}
    shown_revs = {
        "v1.0.0": artifacts_show(NAME, version="v1.0.0", repo=str(clone)),
        "prod": artifacts_show(NAME, stage="prod", repo=str(clone)),
        "latest": artifacts_show(NAME, repo=str(clone)),
    }
    assert shown_revs == {key: {"rev": rev, "path": WEIGHTS} for key, rev in expected.items()}
