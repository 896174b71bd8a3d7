"""Where the end-to-end tests find the real FashionMNIST files, as a folder holding the four .gz.

In order: FMNIST_MIRROR (a folder; an http(s) mirror is downloaded into the cache); this
workplace's shared copy beside the checkout (tests may know ../shared, product code never does);
a cache filled once from the official mirrors by the project's own download code
(stages/download.py, official md5s) and reused, md5-checked, by every later session. With none of
these, `find_real_mirror` says why and how to fix it, and the e2e tests skip.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.artifacts import file_digest

from .tools import REPO

MIRROR_ENV = "FMNIST_MIRROR"  # stages.download's; that module (3 s to import) loads when needed
# FMNIST_SHARED_DATA overrides the shared copy's path (empty: none), e.g. to try the download path.
SHARED_DATA_ENV = "FMNIST_SHARED_DATA"
SHARED_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
# The first contact with a mirror's host: a machine off the network fails here, in seconds.
PROBE_TIMEOUT_S = 5.0
DOWNLOAD = {"retries": 3, "backoff_s": 1.0, "timeout_s": 30.0}

Files = Sequence[tuple[str, str]]


def official() -> tuple[Files, Sequence[str]]:
    """The official files (name, md5) and mirrors, as stages.download knows them."""
    from stages.download import OFFICIAL_FILES, OFFICIAL_MIRRORS

    return OFFICIAL_FILES, OFFICIAL_MIRRORS


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


@dataclass(frozen=True)
class RealMirror:
    folder: Path | None  # None: no real files; `note` says why and how to get them
    note: str
    seconds: float = 0.0


def shared_data(env: Mapping[str, str] = os.environ) -> Path | None:
    override = env.get(SHARED_DATA_ENV)
    if override is None:
        return SHARED_DATA
    return Path(override) if override.strip() else None


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/fashion-mnist-pipeline/raw."""
    base = env.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "fashion-mnist-pipeline" / "raw"


def missing(folder: Path, files: Files) -> list[str]:
    return [name for name, _ in files if not (folder / name).is_file()]


def unverified(folder: Path, files: Files) -> list[str]:
    """The files that are absent from folder or differ from their official md5."""
    return [
        name
        for name, md5 in files
        if not (folder / name).is_file() or file_digest(folder / name, "md5") != md5
    ]


def unreachable(mirrors: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why no http(s) mirror's host (or the http proxy) takes a TCP connection; None if one does.

    Folders are not probed. One connect per host, so a machine off the network fails in seconds,
    not after the download's retries and read timeouts.
    """
    proxies = urllib.request.getproxies()
    errors = []
    for mirror in mirrors:
        if not is_url(mirror):
            return None
        scheme = urllib.parse.urlsplit(mirror).scheme
        via = urllib.parse.urlsplit(proxies[scheme]) if scheme in proxies else None
        target = via or urllib.parse.urlsplit(mirror)
        host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return None
        except OSError as exc:
            errors.append(f"{host}:{port}{' (proxy)' if via else ''}: {exc}")
    return "; ".join(errors) or None


def fill_cache(cache: Path, files: Files, mirrors: Sequence[str]) -> str | None:
    """None once cache holds `files` with their md5s, else why it could not be made to.

    A good cache is reused as it is. Otherwise stages.download fetches all the files again (each
    md5-checked; the folder is replaced only when all are good), so a corrupt file is re-fetched.
    """
    stale = unverified(cache, files)
    if not stale:
        return None
    why = "" if len(stale) == len(files) else f"{', '.join(stale)} in it fail the md5 check, and "
    error = unreachable(mirrors)
    if error:
        return f"{why}no mirror is reachable ({error})"
    from stages.config import parse_params
    from stages.download import download

    params = parse_params({"download": DOWNLOAD})
    try:
        download.fn(params, raw_dir=cache, files=files, mirrors=list(mirrors))
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to skip, reported as such
        return f"{why}the download failed ({type(exc).__name__}: {exc})"
    stale = unverified(cache, files)
    return f"{', '.join(stale)} still wrong after the download" if stale else None


def find_real_mirror(
    env: Mapping[str, str] = os.environ,
    files: Files | None = None,
    mirrors: Sequence[str] | None = None,
) -> RealMirror:
    """The folder the e2e tests use as FMNIST_MIRROR, and how it was found (see the module doc).

    files and mirrors default to the official ones (stages.download's).
    """
    if files is None or mirrors is None:
        official_files, official_mirrors = official()
        files = official_files if files is None else files
        mirrors = official_mirrors if mirrors is None else mirrors
    start = time.monotonic()  # after that import: what `seconds` measures is the looking

    def found(folder: Path | None, note: str) -> RealMirror:
        return RealMirror(folder, note, time.monotonic() - start)

    cache = cache_dir(env)
    fix = (
        f"to run them, set {MIRROR_ENV} to a folder (or http(s) mirror) with the four official .gz "
        f"files, or run once with network access to cache them in {cache}"
    )
    explicit = env.get(MIRROR_ENV, "").strip()
    if explicit and not is_url(explicit):
        folder = Path(explicit).expanduser()
        absent = missing(folder, files)
        if absent:
            return found(None, f"{MIRROR_ENV}={explicit} lacks {', '.join(absent)}; {fix}")
        return found(folder, f"{MIRROR_ENV}={explicit}")
    if explicit:  # an http(s) mirror: the tests copy folders, so download it into the cache
        error = fill_cache(cache, files, [explicit])
        if error:
            return found(None, f"{MIRROR_ENV}={explicit}: {error}; {fix}")
        return found(cache, f"{cache} (from {MIRROR_ENV}={explicit})")
    shared = shared_data(env)
    if shared is not None and not missing(shared, files):
        return found(shared, f"the shared copy {shared}")
    error = fill_cache(cache, files, mirrors)
    if error:
        where = f"no shared copy at {shared}" if shared is not None else "no shared copy"
        return found(None, f"{MIRROR_ENV} is unset, {where}, no download cache: {error}; {fix}")
    return found(cache, f"the download cache {cache}")
