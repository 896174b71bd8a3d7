import base64
import functools
import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.config import Params
from stages.download import (
    MIRROR_ENV,
    OFFICIAL_FILES,
    OFFICIAL_SIZES,
    DownloadError,
    copy_capped,
    download,
    redact,
    sources,
)
from stages.fashion_mnist import RAW_FILES

from .helpers.http import Answer, self_signed, send_head, serve
from .helpers.tools import REPO

Mirror = tuple[Path, list[tuple[str, str]]]


@pytest.fixture
def http_mirror(synthetic_mirror: Mirror) -> Iterator[str]:
    """The synthetic files served over real HTTP on 127.0.0.1."""
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(synthetic_mirror[0])
    )
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_official_checksums_are_torchvisions() -> None:
    assert dict(OFFICIAL_FILES)["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert len(OFFICIAL_FILES) == 4


def test_mirror_env_replaces_official_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, "/some/folder")
    assert sources() == ["/some/folder"]
    monkeypatch.delenv(MIRROR_ENV)
    assert all(url.startswith("http") for url in sources())


def test_copies_and_verifies_from_a_folder(
    tmp_path: Path, synthetic_mirror: Mirror, small_params: Params
) -> None:
    folder, files = synthetic_mirror
    raw = tmp_path / "raw"
    assert download.fn(small_params, raw, files, [str(folder)]) == dict(files)
    assert sorted(p.name for p in raw.iterdir()) == sorted(name for name, _ in files)
    assert (raw / files[0][0]).read_bytes() == (folder / files[0][0]).read_bytes()


def test_downloads_over_http(
    tmp_path: Path, synthetic_mirror: Mirror, http_mirror: str, small_params: Params
) -> None:
    raw = tmp_path / "raw"
    download.fn(small_params, raw, synthetic_mirror[1], [http_mirror])
    assert len(list(raw.iterdir())) == 4


def test_checksum_mismatch_names_the_file_and_leaves_nothing(
    tmp_path: Path, synthetic_mirror: Mirror, small_params: Params
) -> None:
    folder, files = synthetic_mirror
    corrupted = folder / files[1][0]
    corrupted.write_bytes(corrupted.read_bytes()[:-3])
    raw = tmp_path / "raw"
    with pytest.raises(
        DownloadError, match=f"{files[1][0]}: no source gave a verified copy"
    ) as info:
        download.fn(small_params, raw, files, [str(folder)])
    assert f"expected {files[1][1]}" in str(info.value)
    assert not raw.exists()
    assert list(tmp_path.glob(".raw*")) == []  # no staging folder left behind


def test_failure_keeps_the_previous_raw_folder(
    tmp_path: Path, synthetic_mirror: Mirror, small_params: Params
) -> None:
    folder, files = synthetic_mirror
    raw = tmp_path / "raw"
    download.fn(small_params, raw, files, [str(folder)])
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    (folder / files[3][0]).unlink()
    with pytest.raises(DownloadError, match="not found in mirror folder"):
        download.fn(small_params, raw, files, [str(folder)])
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before


def test_next_mirror_is_tried_after_a_bad_one(
    tmp_path: Path, synthetic_mirror: Mirror, small_params: Params
) -> None:
    folder, files = synthetic_mirror
    empty = tmp_path / "empty"
    empty.mkdir()
    download.fn(small_params, tmp_path / "raw", files, [str(empty), str(folder)])
    assert len(list((tmp_path / "raw").iterdir())) == 4


def test_unreachable_mirror_fails_after_the_retries(
    tmp_path: Path, synthetic_mirror: Mirror, small_params: Params
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(DownloadError, match="unreachable after 2 attempts"):
        download.fn(small_params, tmp_path / "raw", synthetic_mirror[1], [url])
    assert not (tmp_path / "raw").exists()


def test_http_404_is_not_retried(tmp_path: Path, http_mirror: str, small_params: Params) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download.fn(small_params, tmp_path / "raw", [("absent.gz", "0" * 32)], [http_mirror])


def test_a_mirror_that_is_neither_folder_nor_url(tmp_path: Path, small_params: Params) -> None:
    with pytest.raises(DownloadError, match="not a folder or an http"):
        download.fn(small_params, tmp_path / "raw", OFFICIAL_FILES, [str(tmp_path / "nope")])


def test_download_fetches_the_raw_files_preprocess_reads() -> None:
    fetched = {name for name, _md5 in OFFICIAL_FILES}
    assert fetched == {name for files in RAW_FILES.values() for name in files}


# Mirrors that misbehave (issue 10): each ends within seconds, names the file and the mirror.
LABELS = "t10k-labels-idx1-ubyte.gz"  # the smallest official file: 5148 bytes
LABELS_SIZE = 5148


@pytest.fixture
def quick_params(small_params: Params) -> Params:
    """A 1 s read timeout: the labels file's deadline is 1 s + 5148 bytes at 100 kB/s."""
    download = small_params.download.model_copy(update={"timeout_s": 1.0})
    return small_params.model_copy(update={"download": download})


def test_official_sizes_are_the_shared_copys() -> None:
    assert set(OFFICIAL_SIZES) == {name for name, _ in OFFICIAL_FILES}
    assert OFFICIAL_SIZES[LABELS] == LABELS_SIZE
    shared = REPO.parent / "shared" / "data" / "fashion-mnist"
    if not shared.is_dir():
        pytest.skip(f"no shared copy at {shared}")
    assert {name: (shared / name).stat().st_size for name in OFFICIAL_SIZES} == OFFICIAL_SIZES


@pytest.mark.parametrize("where", ["body", "headers", "https body"])
def test_a_mirror_that_drips_is_given_up_at_the_files_deadline(
    tmp_path: Path, quick_params: Params, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte every 0.2 s never trips the 1 s read timeout; the deadline ends it."""
    tls = self_signed(tmp_path) if where.startswith("https") else None
    if tls:
        monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))

    def drip(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        if where.endswith("body"):
            send_head(handler, LABELS_SIZE)
        else:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not stop.wait(0.2):
            handler.wfile.write(b"x")
            handler.wfile.flush()

    start = time.monotonic()
    with serve(drip, lifetime_s=10, tls=tls) as url, pytest.raises(DownloadError) as info:
        download.fn(quick_params, tmp_path / "raw", [(LABELS, "0" * 32)], [url])
    assert time.monotonic() - start < 3
    assert f"{LABELS} from {url}{LABELS}: not complete within its deadline of 1.1 s" in str(
        info.value
    )
    assert not (tmp_path / "raw").exists()


def stream(length: int | None, total: int, sent: list[int]) -> Answer:
    """An answer that claims `length` bytes and sends up to `total` zeros, counting them."""

    def answer(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        send_head(handler, length)
        sent.append(0)
        while sent[-1] < total and not stop.is_set():
            handler.wfile.write(bytes(65536))
            sent[-1] += 65536

    return answer


@pytest.mark.parametrize("announced", [None, 10_000_000_000])
def test_a_mirror_that_sends_more_than_the_official_size_is_stopped(
    tmp_path: Path, quick_params: Params, announced: int | None
) -> None:
    sent: list[int] = []
    start = time.monotonic()
    with (
        serve(stream(announced, 200_000_000, sent)) as url,
        pytest.raises(DownloadError) as info,
    ):
        download.fn(quick_params, tmp_path / "raw", [(LABELS, "0" * 32)], [url])
    assert time.monotonic() - start < 3
    where = f"{LABELS} from {url}{LABELS}"
    if announced is None:
        expected = f"{where}: more than its official size ({LABELS_SIZE} bytes) arrived; stopped"
    else:
        expected = (
            f"{where}: Content-Length is {announced} bytes, more than its official size "
            f"({LABELS_SIZE} bytes); not downloaded"
        )
    assert expected in str(info.value)
    assert len(sent) == 1  # not retried
    assert not (tmp_path / "raw").exists()
    assert list(tmp_path.glob(".raw*")) == []


def test_the_size_limit_stops_the_copy(tmp_path: Path) -> None:
    source = io.BytesIO(bytes(1_000_000))
    assert copy_capped(source.read, tmp_path / "f", LABELS_SIZE) is None
    assert (tmp_path / "f").stat().st_size <= LABELS_SIZE
    assert source.tell() <= LABELS_SIZE + 1  # read no further than the first byte too many
    assert copy_capped(io.BytesIO(b"abc").read, tmp_path / "g", 3) == 3


def test_a_mirror_folder_file_larger_than_official_is_refused(
    tmp_path: Path, synthetic_mirror: Mirror, small_params: Params
) -> None:
    folder, files = synthetic_mirror
    (folder / LABELS).write_bytes(bytes(LABELS_SIZE + 1))
    with pytest.raises(DownloadError) as info:
        download.fn(small_params, tmp_path / "raw", files, [str(folder)])
    assert (
        f"{LABELS} in mirror folder {folder}: {LABELS_SIZE + 1} bytes, more than its official "
        f"size ({LABELS_SIZE} bytes); not copied"
    ) in str(info.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    ("reply", "shown"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "BadStatusLine: 'SSH-2.0-OpenSSH_9.6\\r\\n'"),
        (b"", "RemoteDisconnected: 'Remote end closed connection without response'"),
    ],
)
def test_a_reply_that_is_not_http_is_retried_and_named(
    tmp_path: Path, quick_params: Params, reply: bytes, shown: str
) -> None:
    requests: list[str] = []

    def not_http(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        requests.append(handler.path)
        handler.wfile.write(reply)

    start = time.monotonic()
    with serve(not_http) as url, pytest.raises(DownloadError) as info:
        download.fn(quick_params, tmp_path / "raw", [(LABELS, "0" * 32)], [url])
    assert time.monotonic() - start < 3
    assert requests == [f"/{LABELS}"] * 2  # download.retries
    assert f"{url}{LABELS}: failed after 2 attempts (not an HTTP response ({shown}))" in str(
        info.value
    )


def test_a_truncated_body_is_retried(
    tmp_path: Path, synthetic_mirror: Mirror, quick_params: Params
) -> None:
    """Shorter than its Content-Length: a network error, retried (today: an md5 mismatch)."""
    folder, files = synthetic_mirror
    name, md5 = files[3]
    body = (folder / name).read_bytes()
    requests: list[str] = []

    def cut_twice(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        requests.append(handler.path)
        send_head(handler, len(body))
        handler.wfile.write(body if len(requests) > 2 else body[: len(body) // 2])

    download_params = quick_params.download.model_copy(update={"retries": 3})
    params = quick_params.model_copy(update={"download": download_params})
    with serve(cut_twice) as url:
        assert download.fn(params, tmp_path / "raw", [(name, md5)], [url]) == {name: md5}
    assert requests == [f"/{name}"] * 3


def test_a_password_in_the_mirror_url_is_never_shown(
    tmp_path: Path, quick_params: Params, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_error(503)

    with serve(unavailable) as url:
        secret = url.replace("//", "//reader:s3cr%2Ft@")
        with pytest.raises(DownloadError) as info:
            download.fn(quick_params, tmp_path / "raw", [(LABELS, "0" * 32)], [secret])
    shown = url.replace("//", "//reader:***@")
    assert str(info.value).startswith(f"{LABELS}: no source gave a verified copy")
    assert f"{shown}{LABELS}: failed after 2 attempts (HTTP 503 Service Unavailable)" in str(
        info.value
    )
    assert f"{shown}{LABELS}: attempt 1/2 failed" in caplog.text
    assert "s3cr" not in str(info.value) + caplog.text
    assert redact("https://u:p@ss@host:1/x and //v:q@h") == "https://u:***@host:1/x and //v:***@h"
    assert redact("https://host:8080/a@b") == "https://host:8080/a@b"


def test_a_password_in_the_mirror_url_is_sent_as_basic_auth(
    tmp_path: Path, synthetic_mirror: Mirror, quick_params: Params
) -> None:
    folder, files = synthetic_mirror
    name, md5 = files[3]
    expected = "Basic " + base64.b64encode(b"reader:s3cr/t").decode()

    def private(handler: http.server.BaseHTTPRequestHandler, stop: threading.Event) -> None:
        if handler.headers.get("Authorization") != expected:
            handler.send_error(401)
            return
        body = (folder / name).read_bytes()
        send_head(handler, len(body))
        handler.wfile.write(body)

    with serve(private) as url:
        secret = url.replace("//", "//reader:s3cr%2Ft@")
        assert download.fn(quick_params, tmp_path / "raw", [(name, md5)], [secret]) == {name: md5}
        with pytest.raises(DownloadError, match="HTTP 401"):
            download.fn(quick_params, tmp_path / "raw2", [(name, md5)], [url])
