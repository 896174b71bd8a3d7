import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.config import Params
from stages.download import MIRROR_ENV, OFFICIAL_FILES, DownloadError, download, sources
from stages.fashion_mnist import RAW_FILES

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
