"""DVC remotes end to end: push, a fresh `git clone`, pull; the flow's --pull and --push; a
remote with no data, none at all, or one that never answers. A local folder and an S3 endpoint
(moto's server on 127.0.0.1, through dvc-s3 and botocore, as for MinIO or AWS)."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from .helpers.cache import lock_md5, object_in
from .helpers.git import commit_all, fresh_clone
from .helpers.prefect import prefect_api
from .helpers.s3 import CREDENTIALS, s3_endpoint
from .helpers.tools import dvc, run, stages_run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WEIGHTS = "models/model_weights.pth"
TRAINED = "models/train/model_weights.pth"
STAGES = ["validate", "download", "preprocess", "train", "evaluate", "export"]


def flow(repo: Path, api: str, *args: str, check: bool = True, **env: str):
    command = ["python", "-m", "flows.pipeline", *args]
    result = run(command, repo, tool_env(PREFECT_API_URL=api, **env), check=check)
    result.output = result.stdout + result.stderr
    return result


def stage_statuses(output: str) -> dict[str, str]:
    """The flow's closing "stages: validate up to date, train ran, ..." line, as a dict."""
    line = next(x for x in output.splitlines() if "stages: validate" in x)
    pairs = line.split("stages: ", 1)[1].split(", ")
    return {pair.split(" ", 1)[0]: pair.split(" ", 1)[1] for pair in pairs}


def summary(api: str, output: str) -> str:
    run_id = output.split("flow run id ", 1)[1][:36]
    artifacts = prefect_api(api, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return next(a["data"] for a in artifacts if a["key"] == "pipeline-summary")


def test_push_clone_pull_through_a_folder_remote_and_the_flow(
    pipeline_copy: Path, tmp_path: Path, prefect_server: str
) -> None:
    repo, remote = pipeline_copy, tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "shared", str(remote))
    commit_all(repo, "a reproduced pipeline, and its remote")
    assert "files pushed" in dvc(repo, "push").stdout
    assert "in sync" in dvc(repo, "status", "-c").stdout

    clone = fresh_clone(repo, tmp_path / "clone")
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status").stdout
    assert stages_run(dvc(clone, "repro").stdout) == []
    assert (clone / WEIGHTS).read_bytes() == (repo / WEIGHTS).read_bytes()
    # The committed metrics and params, compared against the workspace
    committed = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    shown = json.loads(dvc(clone, "metrics", "diff", "HEAD", "--all", "--json").stdout)
    metrics = shown["reports/evaluate/metrics.json"]
    assert {key: value["old"] for key, value in metrics.items()} == committed
    (clone / "params.yaml").write_text(
        (clone / "params.yaml").read_text().replace("learning_rate: 0.1", "learning_rate: 0.05")
    )
    params = json.loads(dvc(clone, "params", "diff", "HEAD", "--json").stdout)
    changed = params["params.yaml"]["train.learning_rate"]
    assert (changed["old"], changed["new"]) == (0.1, 0.05)

    # The flow on a fresh clone: --pull takes everything, so no stage runs.
    pulled = fresh_clone(repo, tmp_path / "pulled")
    output = flow(pulled, prefect_server, "--pull").output
    assert stage_statuses(output) == dict.fromkeys(STAGES, "up to date")
    assert re.search(r"pulled [1-9]\d* file\(s\), remote `shared`", summary(prefect_server, output))
    assert (pulled / WEIGHTS).read_bytes() == (repo / WEIGHTS).read_bytes()

    # A remote that lost the weights (train's and export's copies share one object): `dvc pull`
    # names them; the flow reruns train, and --push puts the object back.
    md5 = lock_md5(repo, TRAINED)
    lost = object_in(remote, md5)
    lost.unlink()
    partial = fresh_clone(repo, tmp_path / "partial")
    failed = dvc(partial, "pull", check=False)
    assert failed.returncode != 0
    assert TRAINED in failed.stderr + failed.stdout
    output = flow(partial, prefect_server, "--pull", "--push").output
    statuses = stage_statuses(output)
    # train reruns; export's outs then come from the run-cache (its deps are now all there)
    assert {s: statuses[s] for s in STAGES if statuses[s] != "up to date"} == {
        "train": "ran",
        "export": "restored",
    }, statuses
    text = summary(prefect_server, output)
    assert f"not on the remote, so rerun: {WEIGHTS}, {TRAINED}" in text
    assert re.search(r"pushed [1-9]\d* file\(s\)", text), text
    assert lost.is_file()
    assert (partial / TRAINED).read_bytes() == (repo / TRAINED).read_bytes()
    assert (partial / "dvc.lock").read_bytes() == (repo / "dvc.lock").read_bytes()


def test_push_clone_pull_through_an_s3_endpoint(pipeline_copy: Path, tmp_path: Path) -> None:
    repo = pipeline_copy
    with s3_endpoint(tmp_path / "moto.log", "team-store") as endpoint:
        dvc(repo, "remote", "add", "-d", "s3", "s3://team-store/fashion-mnist")
        dvc(repo, "remote", "modify", "s3", "endpointurl", endpoint)
        commit_all(repo, "a reproduced pipeline, and its S3 remote")
        assert "files pushed" in dvc(repo, "push", **CREDENTIALS).stdout
        assert "in sync" in dvc(repo, "status", "-c", **CREDENTIALS).stdout

        clone = fresh_clone(repo, tmp_path / "clone")
        dvc(clone, "pull", **CREDENTIALS)
        assert "in sync" in dvc(clone, "status", "-c", **CREDENTIALS).stdout
        assert stages_run(dvc(clone, "repro").stdout) == []
        assert (clone / WEIGHTS).read_bytes() == (repo / WEIGHTS).read_bytes()


def test_no_remote_is_named_before_any_stage_runs(pipeline_copy: Path, prefect_server: str) -> None:
    lock = (pipeline_copy / "dvc.lock").read_bytes()
    result = flow(pipeline_copy, prefect_server, "--push", check=False)
    assert result.returncode == 1
    assert "error: no default DVC remote in " in result.stderr
    assert "`dvc remote add -d <name> <url>`" in result.stderr
    assert "stages: " not in result.stderr  # it stopped before the pipeline
    pushed = dvc(pipeline_copy, "push", check=False)
    assert pushed.returncode != 0
    assert "dvc remote add -d" in pushed.stderr
    assert (pipeline_copy / "dvc.lock").read_bytes() == lock


def test_a_remote_that_never_answers_fails_within_its_timeouts(
    pipeline_copy: Path, prefect_server: str
) -> None:
    """A port that accepts connections and never replies: each request waits read_timeout, and
    botocore tries each one AWS_MAX_ATTEMPTS times (its default retries take a minute here)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        dvc(pipeline_copy, "remote", "add", "-d", "silent", "s3://nowhere/store")
        for option, value in (("endpointurl", endpoint), ("connect_timeout", "1")):
            dvc(pipeline_copy, "remote", "modify", "silent", option, value)
        dvc(pipeline_copy, "remote", "modify", "silent", "read_timeout", "1")
        lock = (pipeline_copy / "dvc.lock").read_bytes()
        start = time.monotonic()
        attempts = {"AWS_MAX_ATTEMPTS": "2", **CREDENTIALS}
        result = flow(pipeline_copy, prefect_server, "--pull", check=False, **attempts)
        seconds = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert "error: pulling from remote `silent` (s3://nowhere/store) failed: " in result.stderr
    assert seconds < 60, f"{seconds:.0f} s"
    print(f"the silent remote failed the flow after {seconds:.1f} s")
    assert (pipeline_copy / "dvc.lock").read_bytes() == lock
