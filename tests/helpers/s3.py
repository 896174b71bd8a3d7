"""An S3 endpoint on 127.0.0.1: moto's standalone server, spoken to through the real client
path (dvc-s3, s3fs, botocore), configured as for MinIO or AWS."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .tools import VENV_BIN, free_port, tool_env

# moto accepts any key; these keep botocore from looking for real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_endpoint(log: Path, bucket: str, timeout: float = 60) -> Iterator[str]:
    """Starts moto_server, creates `bucket`; yields the endpoint URL; stops the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env=tool_env(**CREDENTIALS),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError as exc:
                assert server.poll() is None, f"moto_server exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"moto_server not up: {exc}"
                time.sleep(0.2)
        create = urllib.request.Request(f"{url}/{bucket}", method="PUT")
        urllib.request.urlopen(create, timeout=10).close()
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
