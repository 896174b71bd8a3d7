"""Data-parallel training (`train.nproc_per_node`, stages/distributed.py, docs/ddp.md).

The multi-process tests run 2 gloo workers on the CPU on the tiny synthetic split (90 train
images); each run costs a few seconds, mostly the workers' imports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

import stages.train
from stages.config import Params, ParamsError, load_params, parse_params
from stages.distributed import (
    RDZV_ENDPOINT_ENV,
    Rank,
    check_batches,
    check_nproc,
    rendezvous,
    with_sync_batchnorm,
)
from stages.errors import StageError
from stages.model import build_model
from stages.train import train

from .helpers.tools import REPO, free_port


def with_train(params: Params, **changes: object) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})


@pytest.mark.parametrize("value", [0, -1, -8])
def test_nproc_per_node_below_1_is_refused_by_name(value: int) -> None:
    with pytest.raises(ParamsError, match=r"train\.nproc_per_node = "):
        parse_params({"train": {"nproc_per_node": value}})


def test_nproc_per_node_defaults_to_1_and_params_yaml_says_so() -> None:
    assert Params().train.nproc_per_node == 1
    assert load_params(REPO / "params.yaml").train.nproc_per_node == 1
    with pytest.raises(ParamsError, match=r"train\.nproc_per_node"):
        parse_params({"train": {"nproc_per_node": "2"}})  # strict: YAML already types it


def test_more_workers_than_gpus_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cuda = torch.device("cuda")
    check_nproc(1, "cuda", cuda)
    with pytest.raises(StageError, match=r"train\.nproc_per_node = 2: more than the 1 CUDA"):
        check_nproc(2, "cuda", cuda)
    with pytest.raises(StageError, match=r"train\.nproc_per_node = 2 with device = 'cuda:0'"):
        check_nproc(2, "cuda:0", torch.device("cuda:0"))
    with pytest.raises(StageError, match=r"train\.nproc_per_node = 2: .* not MPS"):
        check_nproc(2, "mps", torch.device("mps"))
    check_nproc(2, "cpu", torch.device("cpu"))


def test_a_bad_nproc_stops_before_any_training(
    tmp_path: Path,
    processed_dir: Path,
    small_params: Params,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stages.train, "resolve_device", lambda *_: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = []
    monkeypatch.setattr(stages.train, "build_model", lambda *a: started.append(a))
    monkeypatch.setattr(stages.train.distributed, "launch", lambda *a: started.append(a))
    params = with_train(small_params, nproc_per_node=3).model_copy(update={"device": "cuda"})
    weights = tmp_path / "w.pth"
    with pytest.raises(StageError, match=r"train\.nproc_per_node = 3"):
        train.fn(params, processed_dir, weights, tmp_path / "live", tmp_path / "ck.pt")
    assert not started and not weights.exists()


def test_several_machines_need_the_rendezvous_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rendezvous(1) == ["--standalone"]
    monkeypatch.delenv(RDZV_ENDPOINT_ENV, raising=False)
    with pytest.raises(StageError, match=r"train\.nnodes = 2 needs .* FMNIST_RDZV_ENDPOINT=HOST"):
        rendezvous(2)
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "10.0.0.1:29400")
    assert "--rdzv-endpoint=10.0.0.1:29400" in rendezvous(2)
    with pytest.raises(ParamsError, match=r"train\.nnodes = 0"):
        parse_params({"train": {"nnodes": 0}})


def test_every_batch_must_give_each_worker_an_image() -> None:
    check_batches(90, 16, 2)  # last batch 10
    check_batches(54_000, 128, 8)  # last batch 112
    with pytest.raises(
        StageError, match=r"4 workers \(train\.nproc_per_node x train\.nnodes\): a batch of 1 image"
    ):
        check_batches(81, 16, 4)  # last batch 1
    with pytest.raises(StageError, match=r"train\.batch_size = 2"):
        check_batches(90, 2, 4)


@pytest.mark.parametrize("count", [0, 1, 7, 16])
def test_the_ranks_parts_cover_a_batch_in_order(count: int) -> None:
    parts = [Rank(r, 3, r, 3, torch.device("cpu"), Path()).part(count) for r in range(3)]
    assert [i for p in parts for i in range(count)[p]] == list(range(count))
    split = torch.arange(count).tensor_split(3)
    assert [len(range(count)[p]) for p in parts] == [len(t) for t in split]


def test_on_cuda_the_cnns_batchnorm_is_synchronised_in_place(small_params: Params) -> None:
    cnn = build_model(with_train(small_params, model="cnn").train)
    names = list(cnn.state_dict())
    parameters = list(cnn.parameters())
    assert with_sync_batchnorm(cnn, torch.device("cpu")) is cnn  # torch has no CPU SyncBatchNorm
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in cnn.modules())
    synced = with_sync_batchnorm(cnn, torch.device("cuda"))  # converting needs no GPU
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert list(synced.state_dict()) == names  # the weights file keeps its keys
    assert all(a is b for a, b in zip(synced.parameters(), parameters, strict=True))  # optimizer


def curve(live_dir: Path, name: str) -> list[float]:
    return list(pd.read_csv(live_dir / "plots" / "metrics" / f"{name}.tsv", sep="\t").iloc[:, 1])


@pytest.mark.slow
def test_two_workers_learn_like_one_and_repeat_byte_for_byte(
    tmp_path: Path, processed_dir: Path, small_params: Params, trained: dict[str, Path]
) -> None:
    params = with_train(small_params, nproc_per_node=2)
    runs = []
    for name in ("a", "b"):
        paths = {
            "weights_path": tmp_path / name / "w.pth",
            "live_dir": tmp_path / name / "live",
            "checkpoint_path": tmp_path / name / "ck.pt",
        }
        metrics = train.fn(params, processed_dir, **paths)
        runs.append(paths)
    one = curve(trained["live_dir"], "val/accuracy")[-1]
    two = curve(runs[0]["live_dir"], "val/accuracy")
    assert metrics["val/accuracy"] == two[-1]
    assert abs(two[-1] - one) <= 0.01  # the same global batches, the same gradients
    losses = curve(runs[0]["live_dir"], "train/loss")
    assert losses[-1] < losses[0]
    single = curve(trained["live_dir"], "train/loss")
    assert losses == pytest.approx(single, rel=1e-3)  # the all-reduced loss of each whole batch
    first, second = (run["weights_path"].read_bytes() for run in runs)
    assert first == second
    assert not runs[0]["checkpoint_path"].exists()  # a finished run deletes it
    record = json.loads((runs[0]["weights_path"].parent / "record.json").read_text())
    assert record["params"]["train"]["nproc_per_node"] == 2


KILL_RUN = """
import sys
from pathlib import Path
from stages.config import parse_params
from stages.train import train
import json
params = parse_params(json.loads(sys.argv[1]))
out = Path(sys.argv[2])
train.fn(params, Path(sys.argv[3]), out / "w.pth", out / "live", out / "ck.pt")
"""


@pytest.mark.slow
def command_line(process: psutil.Process) -> list[str]:
    """Its command line; empty for a short-lived child that exited after it was listed."""
    try:
        return process.cmdline()
    except psutil.NoSuchProcess:
        return []


def test_a_killed_worker_stops_the_stage_with_an_error(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    params = with_train(small_params, nproc_per_node=2, epochs=100_000)
    raw = json.dumps(params.model_dump(mode="json"))
    command = [sys.executable, "-c", KILL_RUN, raw, str(tmp_path), str(processed_dir)]
    stage = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = [
                p
                for p in psutil.Process(stage.pid).children(recursive=True)
                if "stages.distributed" in (line := command_line(p))
                and "torch.distributed.run" not in line
            ]
        assert len(workers) == 2
        while not (tmp_path / "ck.pt").exists():  # into training: an epoch is done
            assert time.monotonic() < deadline and stage.poll() is None, "no checkpoint"
            time.sleep(0.1)
        workers[-1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = stage.communicate(timeout=60)
        assert time.monotonic() - killed < 60
        assert stage.returncode != 0
        assert "data-parallel training failed" in stderr, stderr[-2000:]
        assert not (tmp_path / "w.pth").exists()
        assert (tmp_path / "ck.pt").is_file()
        # The next run resumes from rank 0's checkpoint (then it is stopped: 100,000 epochs).
        stage = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        assert stage.stderr is not None
        for line in stage.stderr:
            if "resuming from" in line:
                assert str(tmp_path / "ck.pt") in line
                break
        else:
            raise AssertionError("the run after the kill did not resume")
    finally:
        if stage.poll() is None:
            for child in psutil.Process(stage.pid).children(recursive=True):
                child.kill()
            stage.kill()
            stage.wait()


@pytest.mark.slow
def test_two_machines_meet_at_the_rendezvous_and_each_writes_the_same_weights(
    tmp_path: Path, processed_dir: Path, small_params: Params, trained: dict[str, Path]
) -> None:
    """Two "machines" on 127.0.0.1, each a `train` stage with its own outs folder, 1 worker each."""
    params = with_train(small_params, nnodes=2)
    raw = json.dumps(params.model_dump(mode="json"))
    env = {**os.environ, RDZV_ENDPOINT_ENV: f"127.0.0.1:{free_port()}", "PYTHONPATH": str(REPO)}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    machines = [
        subprocess.Popen(
            [sys.executable, "-c", KILL_RUN, raw, str(tmp_path / name), str(processed_dir)],
            cwd=tmp_path / name,  # each machine has its own checkout: no shared .dvc/tmp
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        outputs = [machine.communicate(timeout=180)[1] for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for machine, output in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, output[-3000:]
    ranks = sorted(re.findall(r"data-parallel rank (\d) of (\d)", "".join(outputs)))
    assert ranks == [("0", "2"), ("1", "2")]  # one worker on each machine, one world of 2
    first, second = ((tmp_path / name / "w.pth").read_bytes() for name in ("a", "b"))
    assert first == second  # every rank holds the same weights; each machine wrote its own
    losses = curve(tmp_path / "a" / "live", "train/loss")
    assert losses == pytest.approx(curve(trained["live_dir"], "train/loss"), rel=1e-3)
    record = json.loads((tmp_path / "b" / "record.json").read_text())
    assert record["params"]["train"]["nnodes"] == 2
