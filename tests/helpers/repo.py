"""Copies of the project, for tests that run the pipeline in it or change it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from .tools import REPO

# Params small enough for a full `dvc repro` in about a minute on 2 cores.
SMALL = {"train": {"epochs": 1, "batch_size": 128}}


def copy_repo(dest: Path) -> Path:
    """The project's files as git sees them (tracked or new), in a new git repo with a commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


def edit_params(repo: Path, **sections: dict) -> None:
    """Merges each section dict into the copy's params.yaml; a scalar replaces a top-level key."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(key, {}).update(values)
        else:
            params[key] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def clone_pipeline(source: Path, dest: Path) -> Path:
    """A copy of a reproduced repo, DVC cache included, without DVC's locks and state.

    DVC's cache objects are hard-linked, not copied: DVC never writes one in place (a new object
    is a new file), so the copies stay independent and the suite's disk use stays small. A test
    that damages a cache object must replace the file, not write into it.
    """
    cache = source / ".dvc" / "cache"

    def link_cache_objects(src: str, dst: str) -> None:
        if Path(src).is_relative_to(cache):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(
        source,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns("tmp"),
        copy_function=link_cache_objects,
    )
    return dest
