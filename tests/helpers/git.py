"""git as the tests use it: commits in a copy, and fresh clones that share nothing but git."""

from __future__ import annotations

from pathlib import Path

from .tools import run, tool_env


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args]
    return run(command, repo, tool_env()).stdout


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)


def fresh_clone(repo: Path, dest: Path) -> Path:
    """`git clone`: no DVC cache, no outs; what a teammate's machine starts from."""
    run(["git", "clone", "-q", str(repo), str(dest)], repo.parent, tool_env())
    return dest


def publish(repo: Path, origin: Path) -> Path:
    """A new bare `origin` and `git push --follow-tags` to it: the branch and the annotated tags
    on its commits (gto's versions and stages), as a team shares a registry."""
    run(["git", "init", "-q", "--bare", str(origin)], repo.parent, tool_env())
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "--follow-tags", "origin", "HEAD")
    return origin
