"""python -m stages.download

Fetches the four official FashionMNIST files into data/raw/ and checks each against its official
md5. Sources are the official mirrors, or FMNIST_MIRROR when set: a local folder (copied) or an
http(s) URL (downloaded; `user:password@` in it is sent as HTTP basic auth and shown as `***`).
Network errors are retried (params: download.retries, backoff_s, timeout_s). No file may be larger
than its official size, and each download has a deadline: download.timeout_s plus the official size
at 100 kB/s. A missing file or a checksum mismatch names the file and leaves data/raw/ untouched.
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("download", __doc__)

import base64
import contextlib
import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE
from torchvision.datasets import FashionMNIST
from tqdm import tqdm

from stages.artifacts import atomic_dir, file_digest, require_writable
from stages.config import RAW_DIR, DownloadParams, Params
from stages.errors import StageError
from stages.runtime import run_cli, stage_logger

MIRROR_ENV = "FMNIST_MIRROR"
OFFICIAL_MIRRORS: tuple[str, ...] = tuple(FashionMNIST.mirrors)
# (file name, official md5), as torchvision and the dataset's README publish them.
OFFICIAL_FILES: tuple[tuple[str, str], ...] = tuple(FashionMNIST.resources)
# Their sizes in bytes: no source may send more. Any other name gets the largest of them.
OFFICIAL_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 26421880,
    "train-labels-idx1-ubyte.gz": 29515,
    "t10k-images-idx3-ubyte.gz": 4422102,
    "t10k-labels-idx1-ubyte.gz": 5148,
}
# A file's deadline is timeout_s plus its official size at this rate (bytes/s): 324 s for the
# largest file at the default timeout_s of 60. A slower mirror is given up, not retried.
MIN_RATE = 100_000
CHUNK = 1 << 16


class DownloadError(StageError):
    """A file could not be fetched from any source, or its checksum is wrong."""


def sources() -> list[str]:
    """FMNIST_MIRROR replaces the official mirrors; checksums stay the official ones."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return [mirror] if mirror else list(OFFICIAL_MIRRORS)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def redact(text: str) -> str:
    """text with the password of any `scheme://user:password@` in it shown as ***."""
    return re.sub(r"(//[^/@:\s]*:)[^/\s]*@", r"\1***@", text)


def size_limit(filename: str) -> tuple[int, str]:
    if filename in OFFICIAL_SIZES:
        return OFFICIAL_SIZES[filename], "its official size"
    return max(OFFICIAL_SIZES.values()), "the largest official size"


def copy_capped(read: Callable[[int], bytes], dest: Path, limit: int, progress=None) -> int | None:
    """Writes read()'s bytes to dest and returns their count; None once more than limit arrive
    (dest then holds at most limit bytes)."""
    total = 0
    with dest.open("wb") as out:
        while chunk := read(min(CHUNK, limit + 1 - total)):
            total += len(chunk)
            if total > limit:
                return None
            out.write(chunk)
            if progress:
                progress(len(chunk))
    return total


class Deadline:
    """Shuts the connections of one download when its time is up, so that no read waits past it:
    timeout_s alone bounds each read, not a mirror that sends a byte just before each timeout."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        # A dup shares the connection and outlives TLS's detach of the socket it wraps.
        with self._lock:
            self._sockets.append(sock.dup())
            if self.expired:
                self._expire_locked()
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._expire_locked()

    def _expire_locked(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # the peer has gone already
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in the downloading thread

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


class _Watched:
    """A urllib handler that gives each connection's socket (TLS and proxies included, from the
    first byte) to a Deadline. urllib has no hook for this; http.client's _create_connection is
    the one it calls to open the socket."""

    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        def connection(*args, **kw):
            conn = http_class(*args, **kw)
            create = conn._create_connection
            conn._create_connection = lambda *a, **k: self.deadline.watch(create(*a, **k))
            return conn

        return super().do_open(connection, req, **kwargs)


class _HTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _HTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


def request(url: str) -> urllib.request.Request:
    """A request for url; `user:password@` in it becomes basic auth, never sent on a redirect."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
    token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
    req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def get(url: str, filename: str, dest: Path, timeout_s: float) -> None:
    """One attempt: url into dest, within the file's size limit and deadline."""
    limit, what = size_limit(filename)
    where = f"{filename} from {redact(url)}"
    deadline = Deadline(timeout_s + limit / MIN_RATE)
    too_slow = (
        f"{where}: not complete within its deadline of {deadline.seconds:.1f} s "
        f"(download.timeout_s + {limit} bytes at {MIN_RATE // 1000} kB/s); the mirror is too slow"
    )
    opener = urllib.request.build_opener(_HTTP(deadline), _HTTPS(deadline))
    try:
        with opener.open(request(url), timeout=timeout_s) as response:
            announced = response.length  # Content-Length; None when not given
            if announced is not None and announced > limit:
                raise DownloadError(
                    f"{where}: Content-Length is {announced} bytes, more than {what} "
                    f"({limit} bytes); not downloaded"
                )
            with tqdm(
                total=announced, unit="B", unit_scale=True, desc=filename, leave=False
            ) as bar:
                got = copy_capped(response.read1, dest, limit, bar.update)
            if got is None:
                raise DownloadError(f"{where}: more than {what} ({limit} bytes) arrived; stopped")
            if announced is not None and got < announced:
                raise ConnectionError(f"the connection closed after {got} of {announced} bytes")
    except (OSError, http.client.HTTPException):
        if deadline.expired:
            raise DownloadError(too_slow) from None
        raise
    finally:
        deadline.cancel()
    if deadline.expired:
        raise DownloadError(too_slow)


def fetch_http(url: str, filename: str, dest: Path, params: DownloadParams) -> None:
    log = stage_logger("download")
    shown = redact(url)
    for attempt in range(1, params.retries + 1):
        outcome = "failed"
        try:
            get(url, filename, dest, params.timeout_s)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # the server answered: the file is not there
                raise DownloadError(f"{shown}: HTTP {exc.code} {exc.reason}") from None
            error = f"HTTP {exc.code} {exc.reason}"
        except http.client.HTTPException as exc:  # BadStatusLine, RemoteDisconnected, ...
            error = f"not an HTTP response ({type(exc).__name__}: {str(exc)[:80]!r})"
        except (urllib.error.URLError, OSError) as exc:
            outcome = "unreachable"
            error = str(exc)
        error = redact(error)
        dest.unlink(missing_ok=True)
        if attempt < params.retries:
            delay = params.backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                shown,
                attempt,
                params.retries,
                error,
                delay,
            )
            time.sleep(delay)
    raise DownloadError(f"{shown}: {outcome} after {params.retries} attempts ({error})")


def fetch(source: str, filename: str, dest: Path, params: DownloadParams) -> None:
    if is_url(source):
        fetch_http(f"{source.rstrip('/')}/{filename}", filename, dest, params)
        return
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DownloadError(
            f"{MIRROR_ENV}={redact(source)!r}: not a folder or an http(s) URL; "
            "expected a folder holding the four .gz files or a mirror URL"
        )
    path = folder / filename
    if not path.is_file():
        raise DownloadError(f"{filename}: not found in mirror folder {folder}")
    limit, what = size_limit(filename)
    with path.open("rb") as src:  # capped as well: the file may grow while it is copied
        copied = path.stat().st_size <= limit and copy_capped(src.read, dest, limit) is not None
    if not copied:
        raise DownloadError(
            f"{filename} in mirror folder {folder}: {path.stat().st_size} bytes, more than {what} "
            f"({limit} bytes); not copied"
        )


@task(name="download", cache_policy=NONE, persist_result=False)
def download(
    params: Params,
    raw_dir: Path = RAW_DIR,
    files: Sequence[tuple[str, str]] = OFFICIAL_FILES,
    mirrors: Sequence[str] | None = None,
) -> dict[str, str]:
    """Writes `files` (name, md5) into raw_dir, all verified, or nothing at all."""
    log = stage_logger("download")
    require_writable(raw_dir)
    mirrors = list(mirrors) if mirrors is not None else sources()
    checksums: dict[str, str] = {}
    with atomic_dir(Path(raw_dir)) as staging:
        for filename, md5 in tqdm(files, desc="download", unit="file"):
            dest = staging / filename
            failures = []
            for source in mirrors:
                try:
                    fetch(source, filename, dest, params.download)
                except DownloadError as exc:
                    dest.unlink(missing_ok=True)
                    failures.append(str(exc))
                    continue
                actual = file_digest(dest, "md5")
                if actual == md5:
                    log.info("%s: md5 %s ok (from %s)", filename, md5, redact(source))
                    break
                dest.unlink()
                failures.append(f"{filename} from {redact(source)}: md5 {actual}, expected {md5}")
            else:
                raise DownloadError(
                    f"{filename}: no source gave a verified copy; {raw_dir} was left unchanged\n  "
                    + "\n  ".join(failures)
                )
            checksums[filename] = md5
    log.info("wrote %d verified files to %s", len(checksums), raw_dir)
    return checksums


def prefect_options(params: Params) -> dict[str, float]:
    """Task options for the Prefect flow: it retries the whole task as well, visibly in the UI."""
    return {
        "retries": params.download.retries - 1,
        "retry_delay_seconds": params.download.backoff_s,
    }


def main(argv: list[str] | None = None) -> int:
    return run_cli(download, parse_args("download", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(download, ARGS))
