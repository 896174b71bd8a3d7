"""How stages run: without a Prefect server under `dvc repro`, as task runs when one is set."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from stages import cli, config
from stages import download as download_module

from .helpers.tools import REPO, run, tool_env


def run_download(tmp_path: Path, mirror: Path, **env: str):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return run(
        ["python", "-m", "stages.download"], tmp_path, tool_env(FMNIST_MIRROR=str(mirror), **env)
    )


STAGE_COMMANDS = [
    stage["cmd"] for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
]
# Seconds to import; --help must answer without them.
HEAVY_MODULES = {"torch", "prefect", "dvclive", "pydantic"}


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_help_answers_before_torch_and_prefect_load(command: str) -> None:
    module = command.removeprefix("python -m ")
    result = run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"], REPO, tool_env(), check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: {command} [-h] [--params PARAMS]")
    assert "--params PARAMS" in result.stdout and f"\n{command}\n" in result.stdout  # docstring
    # -X importtime writes "import time: self | cumulative | module" for every module imported.
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not imported & HEAVY_MODULES, f"{module} --help imported {imported & HEAVY_MODULES}"


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_a_bad_argument_is_refused_with_usage(command: str) -> None:
    module = command.removeprefix("python -m ")
    result = run([sys.executable, "-m", module, "--bogus"], REPO, tool_env(), check=False)
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr and "usage:" in result.stderr


@pytest.mark.parametrize(
    ("module", "option"), [("flows.pipeline", "--wait-for-lock"), ("flows.serve", "--cron CRON")]
)
def test_flow_help_answers_before_dvc_and_prefect_load(module: str, option: str) -> None:
    result = run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"], REPO, tool_env(), check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m {module} [-h]") and option in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not imported & (HEAVY_MODULES | {"dvc"}), f"{module} --help imported them"


def test_the_cli_default_params_file_is_the_one_stages_read() -> None:
    assert cli.PARAMS_FILE == config.PARAMS_FILE


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
