"""How a stage stops: SIGTERM, SIGINT, or the death of the `dvc repro` that started it.

`stop_on_signals()` makes either signal raise `StageStopped` in the stage's main thread. It is a
BaseException, like KeyboardInterrupt, so no `except Exception` swallows it on its way out through
the atomic writes, which then replace no out. Inside `deferred()` (torch's file writer, which
cannot be cut half-way and still clean up) the signal waits until the block ends.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
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
