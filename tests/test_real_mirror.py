"""Where the e2e tests find the real files (tests/helpers/mirror.py), without the network.

The download cache is filled by the real stages.download code, with a local folder standing in
for the official mirrors: what these tests show is the cache logic (reuse, re-fetch, refuse), not
that the official mirrors answer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .helpers.data import write_mirror
from .helpers.mirror import cache_dir, fill_cache, find_real_mirror, unverified
from .helpers.tools import free_port


@pytest.fixture
def official(tmp_path: Path) -> tuple[str, list[tuple[str, str]]]:
    """A folder standing in for the official mirrors, and its files' (name, md5)s."""
    folder = tmp_path / "official"
    return str(folder), write_mirror(folder)


def no_shared_copy(tmp_path: Path, **env: str) -> dict[str, str]:
    """An environment with no FMNIST_MIRROR, no shared copy and an empty cache under tmp_path."""
    return {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FMNIST_SHARED_DATA": "", **env}


def test_the_cache_is_filled_once_then_reused(tmp_path: Path, official) -> None:
    mirror, files = official
    env = no_shared_copy(tmp_path)
    cache = cache_dir(env)
    assert cache == tmp_path / "cache" / "fashion-mnist-pipeline" / "raw"

    first = find_real_mirror(env, files=files, mirrors=[mirror])
    assert first.folder == cache and "download cache" in first.note
    assert unverified(cache, files) == []
    mtimes = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}

    gone = str(tmp_path / "unreachable")  # a second session needs no mirror at all
    second = find_real_mirror(env, files=files, mirrors=[gone])
    assert second.folder == cache
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == mtimes


def test_a_corrupt_cache_file_is_fetched_again(tmp_path: Path, official) -> None:
    mirror, files = official
    cache = tmp_path / "raw"
    assert fill_cache(cache, files, [mirror]) is None
    damaged = cache / files[0][0]
    damaged.write_bytes(damaged.read_bytes()[:-10])

    assert unverified(cache, files) == [files[0][0]]
    assert fill_cache(cache, files, [mirror]) is None
    assert unverified(cache, files) == []


def test_a_corrupt_cache_is_refused_without_a_mirror(tmp_path: Path, official) -> None:
    mirror, files = official
    env = no_shared_copy(tmp_path)
    assert fill_cache(cache_dir(env), files, [mirror]) is None
    (cache_dir(env) / files[2][0]).write_bytes(b"not gzip")

    found = find_real_mirror(env, files=files, mirrors=[str(tmp_path / "unreachable")])
    assert found.folder is None
    assert f"{files[2][0]} in it fail the md5 check" in found.note
    assert "FMNIST_MIRROR is unset" in found.note and "to run them, set FMNIST_MIRROR" in found.note


def test_no_network_skips_in_seconds(tmp_path: Path, official) -> None:
    _, files = official
    closed = f"http://127.0.0.1:{free_port()}/"  # nothing listens: what no network looks like
    start = time.monotonic()
    found = find_real_mirror(no_shared_copy(tmp_path), files=files, mirrors=[closed])
    assert time.monotonic() - start < 5
    assert found.folder is None
    assert "no mirror is reachable" in found.note
    assert "run once with network access" in found.note


def test_fmnist_mirror_comes_first_then_the_shared_copy(tmp_path: Path, official) -> None:
    mirror, files = official
    shared = tmp_path / "shared"
    write_mirror(shared)
    gone = [str(tmp_path / "unreachable")]
    env = no_shared_copy(tmp_path, FMNIST_SHARED_DATA=str(shared))

    assert find_real_mirror(env, files=files, mirrors=gone).folder == shared
    explicit = find_real_mirror({**env, "FMNIST_MIRROR": mirror}, files=files, mirrors=gone)
    assert explicit.folder == Path(mirror)

    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = find_real_mirror({**env, "FMNIST_MIRROR": str(empty)}, files=files, mirrors=gone)
    assert wrong.folder is None and files[0][0] in wrong.note
