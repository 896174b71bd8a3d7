"""Real filesystems for disk tests: a tiny tmpfs (a full disk), a read-only view of a folder.

The tests that use them skip, saying why, where mounting is not allowed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tiny_disk(folder: Path, size: str = "64k") -> Iterator[Path]:
    """`folder` as the mount point of a new tmpfs of `size`, unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    """`source` seen read-only at `view` (a read-only bind mount): root writes through modes."""
    view.mkdir(parents=True, exist_ok=True)
    for command in (
        ["mount", "--bind", str(source), str(view)],
        ["mount", "-o", "remount,ro,bind", str(view)],
    ):
        made = subprocess.run(command, capture_output=True, text=True)
        if made.returncode != 0:
            subprocess.run(["umount", str(view)], capture_output=True)
            pytest.skip(f"cannot make a read-only bind mount here: {made.stderr.strip()}")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)
