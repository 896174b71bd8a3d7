"""python -m stages.download

Fetches the four official FashionMNIST files into data/raw/ and checks each against its official
md5. Sources are the official mirrors, or FMNIST_MIRROR when set: a local folder (copied) or an
http(s) URL (downloaded). Network errors are retried (params: download.retries, backoff_s,
timeout_s). A missing file or a checksum mismatch names the file and leaves data/raw/ untouched.
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("download", __doc__)

import os
import shutil
import socket
import time
import urllib.error
from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import download_url
from tqdm import tqdm

from stages.artifacts import atomic_dir, file_digest, require_writable
from stages.config import RAW_DIR, DownloadParams, Params
from stages.errors import StageError
from stages.runtime import run_cli, stage_logger

MIRROR_ENV = "FMNIST_MIRROR"
OFFICIAL_MIRRORS: tuple[str, ...] = tuple(FashionMNIST.mirrors)
# (file name, official md5), as torchvision and the dataset's README publish them.
OFFICIAL_FILES: tuple[tuple[str, str], ...] = tuple(FashionMNIST.resources)


class DownloadError(StageError):
    """A file could not be fetched from any source, or its checksum is wrong."""


def sources() -> list[str]:
    """FMNIST_MIRROR replaces the official mirrors; checksums stay the official ones."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return [mirror] if mirror else list(OFFICIAL_MIRRORS)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch_http(url: str, dest: Path, params: DownloadParams) -> None:
    log = stage_logger("download")
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(params.timeout_s)  # torchvision's urlopen takes no timeout itself
    try:
        for attempt in range(1, params.retries + 1):
            try:
                download_url(url, str(dest.parent), dest.name)
                return
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # the server answered: the file is not there
                    raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
                error: Exception = exc
            except (urllib.error.URLError, OSError) as exc:
                error = exc
            dest.unlink(missing_ok=True)
            if attempt < params.retries:
                delay = params.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                    url,
                    attempt,
                    params.retries,
                    error,
                    delay,
                )
                time.sleep(delay)
        raise DownloadError(f"{url}: unreachable after {params.retries} attempts ({error})")
    finally:
        socket.setdefaulttimeout(previous_timeout)


def fetch(source: str, filename: str, dest: Path, params: DownloadParams) -> None:
    if is_url(source):
        fetch_http(f"{source.rstrip('/')}/{filename}", dest, params)
        return
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DownloadError(
            f"{MIRROR_ENV}={source!r}: not a folder or an http(s) URL; "
            "expected a folder holding the four .gz files or a mirror URL"
        )
    if not (folder / filename).is_file():
        raise DownloadError(f"{filename}: not found in mirror folder {folder}")
    shutil.copyfile(folder / filename, dest)


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
                    failures.append(str(exc))
                    continue
                actual = file_digest(dest, "md5")
                if actual == md5:
                    log.info("%s: md5 %s ok (from %s)", filename, md5, source)
                    break
                dest.unlink()
                failures.append(f"{filename} from {source}: md5 {actual}, expected {md5}")
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
