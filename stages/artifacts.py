"""Atomic writes: every out is written to a temporary name beside it and renamed into place.

A stage killed half-way leaves the old file or none, never a truncated one for DVC to commit.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

from stages.errors import StageError
from stages.inputs import before_replacing, read_spec
from stages.signals import deferred


class OutputError(StageError):
    """An out cannot be written where it belongs."""


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _temp_prefix(dest: Path) -> str:
    # The PID lets a later run tell a killed writer's leftovers from a live writer's files.
    return f".{dest.name}.{os.getpid()}."


def remove_stale_temps(dest: Path) -> None:
    """Deletes temporaries that a killed writer of `dest` left behind beside it."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)\.[^.]+\.tmp$")
    for leftover in dest.parent.glob(f".{dest.name}.*"):
        match = pattern.match(leftover.name)
        if match and not psutil.pid_exists(int(match.group(1))):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    old = dest.with_name(f".{dest.name}.old")
    if old.exists() and not dest.exists():  # killed between atomic_dir's two renames
        os.replace(old, dest)
    shutil.rmtree(old, ignore_errors=True)


def _unwritable(dest: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"{dest}: cannot write into {dest.parent}/ ({exc.strerror}); "
        "expected a folder this user can write"
    )


def _folder_in_the_way(dest: Path) -> OutputError:
    return OutputError(
        f"{dest}: is a folder, expected a file (or nothing) there; move or delete the folder"
    )


# A full disk, or a full quota: the same advice.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def _mount_point(folder: Path) -> Path:
    path = folder.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _disk_full(folder: Path, exc: OSError) -> OutputError:
    usage = shutil.disk_usage(folder)
    needed = getattr(exc, "needed", None)  # set by torch_save, which knows the archive's size
    need = f"{_size(needed)}" if needed else f"more than the {_size(usage.free)} free"
    return OutputError(
        f"{folder}/: no space left on the disk mounted at {_mount_point(folder)} "
        f"({_size(usage.free)} free of {_size(usage.total)}; {exc.strerror}); this write needs "
        f"{need}. Free some space (`dvc gc --workspace` drops cache objects that no out uses) "
        "and run again; no out was replaced"
    )


@contextmanager
def _naming_a_full_disk(folder: Path, remove_temporaries: Callable[[], object]) -> Iterator[None]:
    """Turns a full disk inside the block into an OutputError that names it and the space."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        remove_temporaries()  # first, so that the message gives the space free
        raise _disk_full(folder, exc) from None


def require_writable(*dests: Path, files: bool = False) -> None:
    """Fails before any work unless each out's folder takes a new file (what a rename needs);
    with `files`, also unless each dest is a file or nothing (a folder there cannot be replaced by
    a file)."""
    for dest in map(Path, dests):
        if files and dest.is_dir():
            raise _folder_in_the_way(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=dest.parent):
                pass
        except OSError as exc:
            raise _unwritable(dest, exc) from None


def _new_temp(dest: Path, folder: bool) -> Path:
    """An empty temporary file or folder beside dest, after clearing a killed writer's ones."""
    if not folder and dest.is_dir():  # found before anything is written, not at the rename
        raise _folder_in_the_way(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)
        if folder:
            return Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
        os.close(fd)
        return Path(name)
    except OSError as exc:
        raise _unwritable(dest, exc) from None


def _keep_git_ignores(old: Path, new: Path) -> None:
    # DVC writes .gitignore files into folders that hold outs (reports/train/ holds two), and git
    # tracks them: a folder swapped in must carry them over, or the outs show up in `git status`.
    if not old.is_dir():
        return
    for ignore in old.rglob(".gitignore"):
        target = new / ignore.relative_to(old)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ignore, target)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside dest; it replaces dest only if the block succeeds."""
    dest = Path(dest)
    tmp = _new_temp(dest, folder=True)
    try:
        with _naming_a_full_disk(dest.parent, lambda: shutil.rmtree(tmp, ignore_errors=True)):
            yield tmp
        before_replacing(dest)
        _keep_git_ignores(dest, tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
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


@contextmanager
def atomic_paths(*dests: Path) -> Iterator[list[Path]]:
    """Yields a temporary path beside each dest; none replaces its dest unless the block succeeds.

    For a stage's several outs: all are written and synced before the first rename; only a kill
    between the renames (microseconds) could leave old and new outs side by side, and
    `dvc status` would show it.
    """
    dests = tuple(map(Path, dests))
    temps: list[Path] = []
    try:
        temps += [_new_temp(dest, folder=False) for dest in dests]
        with _naming_a_full_disk(
            dests[0].parent, lambda: [t.unlink(missing_ok=True) for t in temps]
        ):
            yield list(temps)
            for tmp in temps:
                _fsync(tmp)
        for tmp in temps:
            os.chmod(tmp, 0o644)
        for dest in dests:
            before_replacing(dest)
        for tmp, dest in zip(temps, dests, strict=True):
            os.replace(tmp, dest)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yields a temporary path in dest's folder; renames it onto dest only if the block succeeds."""
    with atomic_paths(dest) as (tmp,):
        yield tmp


def write_text(text: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def json_text(obj: Any) -> str:
    # allow_nan=False: NaN and Infinity are not JSON, and no out of ours may claim one.
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(obj: Any, dest: Path) -> None:
    write_text(json_text(obj), dest)


def torch_save(obj: Any, path: Path) -> None:
    # Through a file object: given a path, torch names the archive's records after the file, and
    # the random temporary name would make identical weights hash differently.
    # Serialised in memory first: on a full disk torch's zip writer fails with "unexpected pos",
    # while a plain write fails with ENOSPC, and the size it needed is known.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    # A stop signal waits: a write cut half-way would leave a torn file behind the signal.
    with open(path, "wb") as handle, deferred():
        try:
            handle.write(buffer.getbuffer())
        except OSError as exc:
            exc.needed = buffer.getbuffer().nbytes  # for the disk-full message
            raise


def save_torch(obj: Any, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        torch_save(obj, tmp)


def load_torch(path: Path) -> Any:
    """Loads tensors and plain containers only: weights_only refuses pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


STAGES_SOURCE = Path(__file__).resolve().parent


def source_digest(stage: str = "train") -> str:
    """sha256 over the code `stage` runs: the .py deps dvc.yaml lists for it (its module and
    each shared one it imports), else all of stages/*.py. DVC reruns the stage when one of those
    changes, and only then, so the digest moves with dvc.lock: an edit of code the stage does
    not run (stages/predict.py) changes neither."""
    root = STAGES_SOURCE.parent
    spec = read_spec(stage, root / "dvc.yaml")
    if spec is None:
        files = [path.relative_to(root) for path in STAGES_SOURCE.glob("*.py")]
    else:
        files = [path for path in spec.deps if path.suffix == ".py"]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + (root / path).read_bytes())
    return digest.hexdigest()


def file_digest(path: Path, algorithm: str = "md5") -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()
