"""How stages run: without a Prefect server under `dvc repro`, as task runs when one is set."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from stages import download as download_module

from .conftest import REPO, run, tool_env


def run_download(tmp_path: Path, mirror: Path, **env: str):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return run(
        ["python", "-m", "stages.download"], tmp_path, tool_env(FMNIST_MIRROR=str(mirror), **env)
    )


def test_bad_params_exit_non_zero_with_the_key_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("download:\n  retries: 0\n")
    assert download_module.main(["--params", str(params)]) == 1
    assert (
        "download.retries = 0: Input should be greater than or equal to 1"
        in capsys.readouterr().err
    )


@pytest.mark.e2e
def test_no_prefect_server_is_started_without_an_api_url(tmp_path: Path, real_mirror: Path) -> None:
    home = tmp_path / "prefect-home"
    result = run_download(tmp_path, real_mirror, PREFECT_HOME=str(home))
    assert "as a Prefect task run: False" in result.stderr
    assert len(list((tmp_path / "data/raw").iterdir())) == 4
    # Prefect's temporary server would have created its database here.
    assert not (home / "prefect.db").exists()


@pytest.mark.e2e
def test_stage_is_a_task_run_on_a_configured_server(
    tmp_path: Path, real_mirror: Path, prefect_server: str
) -> None:
    result = run_download(
        tmp_path,
        real_mirror,
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=str(tmp_path / "client-home"),
    )
    assert "as a Prefect task run: True" in result.stderr
    request = urllib.request.Request(
        f"{prefect_server}/task_runs/filter",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        task_runs = json.load(response)
    states = {r["name"]: r["state_type"] for r in task_runs if r["name"].startswith("download")}
    assert "COMPLETED" in states.values(), task_runs


@pytest.mark.parametrize("module", ["stages.export", "flows.pipeline"])
def test_a_dead_prefect_server_is_a_clear_error_not_a_hang(tmp_path: Path, module: str) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    started = time.monotonic()
    result = run(
        ["python", "-m", module],
        tmp_path,
        tool_env(PREFECT_API_URL="http://127.0.0.1:9/api"),
        check=False,
    )
    assert result.returncode == 1
    assert "no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:9/api" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
