"""DVC cache objects, and damage to them that DVC cannot see (tests of stages/verify.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def cache_object(repo: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object named md5 (a folder's ends in .dir) in repo's local cache."""
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


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
