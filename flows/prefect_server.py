"""The Prefect server a flow run talks to: checked, or started for the run, and watched.

`temporary_server()` starts Prefect's own temporary API server (what Prefect starts by itself
when no PREFECT_API_URL is set) in a session of its own, and stops it when the run ends: Prefect's
own would stay running after a SIGTERM to the flow, and die with a terminal's Ctrl-C before the
flow could report its end. `ServerWatch` stops a run, as Ctrl-C would, once its server is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

from prefect.events.worker import EventsWorker
from prefect.logging import get_logger
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_REQUEST_TIMEOUT,
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    get_current_settings,
    temporary_settings,
)

from stages.errors import StageError
from stages.runtime import prefect_server_problem
from stages.signals import deferred

# Prefect's client waits 60 s for an answer and retries 5 times, 2 s to 32 s apart: a minute or
# more per request once the server is gone. A run uses these instead, unless PREFECT_* settings
# say otherwise.
CLIENT_DEFAULTS = {PREFECT_API_REQUEST_TIMEOUT: 10.0, PREFECT_CLIENT_MAX_RETRIES: 2}
WATCH_EVERY_S = 1.0
GONE_AFTER_S = 5.0  # failed probes for this long: the server is gone (a restart takes longer)
SERVER_STOP_S = 5.0
# Prefect's own temporary server (create_app(ephemeral=True): the API, no UI or scheduler),
# dying with the flow even on SIGKILL (Linux).
SERVER_CODE = """
import os, signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[2]):
        sys.exit("the flow run that started this server has ended")
import uvicorn
from prefect.server.api.server import create_app
app = create_app(ephemeral=True, final=True)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's session, then SIGKILL if it is still there after SERVER_STOP_S."""
    with deferred():  # a second Ctrl-C must not leave it running
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(SERVER_STOP_S)
                return


def start_server(port: int, timeout: float) -> subprocess.Popen | None:
    """The temporary server on `port` once it answers; None if it exited (port taken)."""
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(port), str(os.getpid())],
        start_new_session=True,  # a terminal's Ctrl-C reaches the flow only, which stops it
    )
    deadline = time.monotonic() + timeout
    try:
        while server.poll() is None:
            health = f"http://127.0.0.1:{port}/api/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=1):
                return server
            if time.monotonic() > deadline:
                raise StageError(
                    f"Prefect's temporary server did not start within {timeout:g} s "
                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to "
                    "a server of your own"
                )
            time.sleep(0.2)
    except BaseException:
        stop_server(server)
        raise
    return None


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """Prefect's temporary server for this run; yields its API URL, and stops it at the end.

    Prefect would start the same server itself, in the flow's process group, stopped only at
    exit: a SIGTERM to the flow left it running, and a terminal's Ctrl-C stopped it too, so that
    the flow then spent minutes reporting its end to a server that was gone.
    """
    timeout = get_current_settings().server.ephemeral.startup_timeout_seconds
    for _ in range(3):  # another process may take the free port first
        port = free_port()
        server = start_server(port, timeout)
        if server is not None:
            break
    else:
        raise StageError("Prefect's temporary server exited at start, 3 times; see above")
    url = f"http://127.0.0.1:{port}/api"
    get_logger("flows").info("Prefect's temporary server for this run: %s", url)
    try:
        yield url
    finally:
        if server.poll() is None:
            # What Prefect still holds for the server (logs, task run events) reaches it first.
            APILogWorker.drain_all(timeout=SERVER_STOP_S)
            EventsWorker.drain_all(timeout=SERVER_STOP_S)
        stop_server(server)


class ServerWatch:
    """Stops the run, as Ctrl-C would, when its Prefect server has failed probes for GONE_AFTER_S.

    Stages report to the server in the background, so without this a run whose server was
    killed went on to its end, then spent minutes retrying its last reports.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.gone: str | None = None  # why, once the server is found gone
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="server-watch", daemon=True)

    def __enter__(self) -> ServerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        failing_since = None
        while not self._done.wait(WATCH_EVERY_S):
            problem = prefect_server_problem(self.url)
            if problem is None:
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since < GONE_AFTER_S:
                continue
            with self._lock:
                if not self._done.is_set():
                    self.gone = problem
                    # SIGINT, not an exception here: it interrupts whatever the main thread waits
                    # on, and a stage stops within a batch, replacing no out.
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return


@contextlib.contextmanager
def flow_server(url: str | None) -> Iterator[ServerWatch]:
    """For a flow run: the server at `url` (already checked) or, without one, a temporary server;
    the client settings pointing at it; and the watch that stops the run if it goes away."""
    with contextlib.ExitStack() as stack:
        if not url:
            url = stack.enter_context(temporary_server())
        stack.enter_context(
            temporary_settings(updates={PREFECT_API_URL: url}, set_defaults=CLIENT_DEFAULTS)
        )
        yield stack.enter_context(ServerWatch(url))


def report_end(exc: BaseException, watch: ServerWatch | None, flow_name: str, kept: str) -> int:
    """Prints the one `error:` line for why flow `flow_name` ended early; its exit code.
    `kept` says what the run leaves behind. Raises `exc` if it is none of these.

    When the server went away, this ends the process at once (os._exit): all that is left to do
    is what Prefect does at exit, sending its queued logs and events to that server, retrying
    each for seconds.
    """
    import httpx  # Prefect's client is built on it: its errors are what a failed API call raises
    from dvc.exceptions import DvcException

    from stages.errors import StageError
    from stages.runtime import prefect_api_url
    from stages.signals import StageStopped

    if watch is not None and watch.gone:
        print(
            f"error: the Prefect server went away mid-run: {watch.gone}; the flow stopped: {kept}; "
            "start the server again and rerun",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if isinstance(exc, StageStopped):
        print(f"error: flow {flow_name}: stopped by {exc}; {kept}", file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, httpx.HTTPError):
        url = watch.url if watch else prefect_api_url()
        print(
            f"error: a request to the Prefect server at PREFECT_API_URL={url} failed "
            f"({type(exc).__name__}: {exc}); the flow stopped: {kept}",
            file=sys.stderr,
        )
        return 1
    if isinstance(exc, (StageError, DvcException)):
        # DVC wraps a failed stage's error ("failed to reproduce 'train'"): show both.
        cause = f": {exc.__cause__}" if isinstance(exc.__cause__, StageError) else ""
        print(f"error: {exc}{cause}", file=sys.stderr)
        return 1
    raise exc
