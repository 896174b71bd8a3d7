"""DVC's locks, held for a whole flow run.

`dvc repro` holds its repo lock, and lets go of it while a stage's command runs, keeping path
locks (rwlock): read on that stage's deps, write on its outs. A flow run holds both from start to
end, on every dep and out, so a flow run and a `dvc repro` never interleave: whichever comes
second fails within seconds with `PipelineBusyError`, or waits.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dvc.lock import LockError
from dvc.repo import Repo, lock_repo
from dvc.rwlock import rwlock

from stages.artifacts import require_writable
from stages.errors import StageError


class PipelineBusyError(StageError):
    """Another `dvc repro` or flow run holds DVC's repo lock or a path this run uses."""


def require_writable_checkout(root: Path) -> None:
    """Fails, naming the folder, unless DVC can write its locks (a read-only checkout cannot):
    DVC itself would fail there with a traceback."""
    require_writable(Path(root) / ".dvc" / "tmp" / "lock")


@contextmanager
def hold_pipeline(repo: Repo, wait: bool) -> Iterator[None]:
    """Holds DVC's repo lock, and its path locks on every dep and out, until the block ends.

    `dvc repro` lets go of the repo lock while a stage's command runs, keeping only path locks:
    read on that stage's deps, write on its outs. Asking to write every path is how a run sees
    it mid-stage, even mid-`validate`, which has no outs.
    """
    stages = repo.index.stages
    paths = list(dict.fromkeys(item.fs_path for s in stages for item in (*s.deps, *s.outs)))
    hardlink = repo.config["core"].get("hardlink_lock", False)
    cmd = " ".join(sys.argv)  # what DVC records for its own path locks in this process
    while True:
        with ExitStack() as held:
            try:
                held.enter_context(lock_repo(repo))  # DVC's retries: seconds, or for ever
                held.enter_context(rwlock(repo.tmp_dir, repo.fs, cmd, [], paths, hardlink))
            except LockError as exc:
                busy = exc
            else:
                yield
                return
        if not wait:
            raise PipelineBusyError(
                f"pipeline busy: {busy}\ntry again when it ends, "
                "or pass --wait-for-lock (wait_for_lock=True)"
            )
        time.sleep(1)
