"""DVC cache objects, what dvc.lock names, and damage to objects that DVC cannot see."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml


def object_in(store: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object named md5 (a folder's ends in .dir) in a cache or a folder
    remote."""
    return store / "files" / "md5" / md5[:2] / md5[2:]


def cache_object(repo: Path, md5: str) -> Path:
    """The object named md5 in repo's local cache."""
    return object_in(repo / ".dvc" / "cache", md5)


def lock_md5(repo: Path, out: str) -> str:
    """The md5 repo's dvc.lock records for the out `out` (a file, or a folder's .dir)."""
    for stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values():
        for entry in stage.get("outs", []):
            if entry["path"] == out:
                return entry["md5"]
    raise AssertionError(f"{out} not in dvc.lock")


def corrupt_keeping_stat(path: Path) -> bytes:
    """Flips one byte of path, keeping its size, mode, atime and mtime; returns the new bytes.

    Writes a new file and renames it over path, never into the old one: pipeline copies share
    their cache objects with the session's pipeline as hard links (tests/helpers/repo.py), and
    writing into one would damage every copy.
    """
    old = path.read_bytes()
    if not old:
        raise ValueError(f"{path}: empty, so no byte to flip")
    info = path.stat()
    middle = len(old) // 2
    new = old[:middle] + bytes([old[middle] ^ 0xFF]) + old[middle + 1 :]
    temp = path.with_name(f".{path.name}.corrupt")
    temp.write_bytes(new)
    os.chmod(temp, stat.S_IMODE(info.st_mode))
    os.utime(temp, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(temp, path)
    return new
