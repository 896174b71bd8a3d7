"""Atomic writes: every out is written to a temporary name beside it and renamed into place.

A stage killed half-way leaves the old file or none, never a truncated one for DVC to commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yields a temporary path in dest's folder; renames it onto dest only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside dest; it replaces dest only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            _fsync(child)
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(text: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(obj: Any, dest: Path) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", dest)


def save_torch(obj: Any, dest: Path) -> None:
    # Through a file object: given a path, torch names the archive's records after the file, and
    # the random temporary name would make identical weights hash differently.
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def load_torch(path: Path) -> Any:
    """Loads tensors and plain containers only: weights_only refuses pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def file_digest(path: Path, algorithm: str = "md5") -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()
