"""How a stage stops: SIGTERM, SIGINT, or the death of the `dvc repro` that started it.

`stop_on_signals()` makes either signal raise `StageStopped` in the stage's main thread. It is a
BaseException, like KeyboardInterrupt, so no `except Exception` swallows it on its way out through
the atomic writes, which then replace no out. Inside `deferred()` (torch's file writer, which
cannot be cut half-way and still clean up) the signal waits until the block ends.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Shells that may fork for `sh -c CMD` instead of replacing themselves with CMD (dash does).
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "busybox"}
WATCH_EVERY_S = 0.2
_deferring = 0
_pending: list[int] = []


class StageStopped(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if _deferring:
        _pending.append(signum)
    else:
        raise StageStopped(signum)


def stop_on_signals(parent_death: bool = True) -> None:
    """SIGTERM and SIGINT raise StageStopped; with `parent_death`, the death of the parent process
    sends SIGTERM (Linux), so a killed `dvc repro` leaves no stage running on unseen to overwrite
    outs later."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    if parent_death and sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        _watch_past_a_shell()


def _watch_past_a_shell() -> None:
    """DVC runs a stage as `$SHELL -c CMD`, or `/bin/sh -c CMD` without $SHELL (cron, systemd).
    dash, Debian's /bin/sh, forks CMD rather than becoming it, so the stage's parent is a shell
    that outlives a killed `dvc repro`, and PR_SET_PDEATHSIG never fires. Then a thread watches
    the shell's parent instead, and sends SIGTERM once the shell is orphaned."""
    try:
        shell = psutil.Process().parent()
        if shell is None or shell.name() not in SHELLS:
            return
        starter = shell.ppid()
    except psutil.Error:
        return

    def watch() -> None:
        try:
            while shell.ppid() == starter:
                time.sleep(WATCH_EVERY_S)
        except psutil.Error:
            pass  # the shell is gone, so PR_SET_PDEATHSIG has fired
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-death", daemon=True).start()


@contextmanager
def deferred() -> Iterator[None]:
    """Holds a stop signal until the block ends, then raises it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending:
        raise StageStopped(_pending.pop(0))
