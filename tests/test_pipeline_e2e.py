"""End to end: the real `dvc repro` on the real FashionMNIST files, in a copy of the repo."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages.artifacts import file_digest
from stages.model import NeuralNetwork

from .helpers.repo import copy_repo, edit_params
from .helpers.tools import REPO, dvc, run, stages_run, tool_env

pytestmark = pytest.mark.e2e

STAGES = ["validate", "download", "preprocess", "train", "evaluate", "export"]
TRAINED, EXPORTED = "models/train/model_weights.pth", "models/model_weights.pth"
OUTS = [
    "data/raw/train-images-idx3-ubyte.gz",
    "data/processed/train.pt",
    "data/processed/val.pt",
    "data/processed/test.pt",
    "data/processed/stats.json",
    "models/train/model_weights.pth",
    "reports/train/metrics.json",
    "reports/train/plots/metrics/val/accuracy.tsv",
    "reports/evaluate/metrics.json",
    "reports/evaluate/per_class.csv",
    "reports/evaluate/confusion.csv",
    "reports/evaluate/confusion_matrix.png",
    "reports/evaluate/training_curves.png",
    "models/model_weights.pth",
    "models/model.safetensors",
    "models/model.onnx",
    "models/model_card.json",
    "models/model_card.md",
]


def test_repro_runs_every_stage_and_produces_every_out(pipeline: tuple[Path, str]) -> None:
    repo, output = pipeline
    assert stages_run(output) == STAGES
    missing = [out for out in OUTS if not (repo / out).is_file()]
    assert missing == []


def test_accuracy_is_above_075_and_shown_by_dvc_metrics(pipeline: tuple[Path, str]) -> None:
    repo, _ = pipeline
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]["reports/evaluate/metrics.json"]["data"]
    assert metrics["accuracy"] > 0.75
    assert metrics["loss"] > 0


def test_exported_weights_load_strictly_into_the_seed_class(pipeline: tuple[Path, str]) -> None:
    state = torch.load(pipeline[0] / "models/model_weights.pth", weights_only=True)
    NeuralNetwork().load_state_dict(state, strict=True)


def test_second_repro_runs_no_stage(pipeline_copy: Path) -> None:
    result = dvc(pipeline_copy, "repro")
    assert stages_run(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout


def test_forced_rerun_is_byte_identical(pipeline_copy: Path, real_mirror: Path) -> None:
    lock = (pipeline_copy / "dvc.lock").read_bytes()
    result = dvc(pipeline_copy, "repro", "--force", FMNIST_MIRROR=str(real_mirror))
    assert stages_run(result.stdout) == STAGES
    weights = pipeline_copy / "models/train/model_weights.pth"
    print(
        f"forced rerun: dvc.lock sha256 {hashlib.sha256(lock).hexdigest()} before, "
        f"{file_digest(pipeline_copy / 'dvc.lock', 'sha256')} after; "
        f"weights sha256 {file_digest(weights, 'sha256')}"
    )
    assert (pipeline_copy / "dvc.lock").read_bytes() == lock


def test_a_learning_rate_change_reruns_train_and_going_back_takes_the_run_cache(
    pipeline_copy: Path,
) -> None:
    first = (pipeline_copy / "params.yaml").read_text()
    weights = {out: (pipeline_copy / out).read_bytes() for out in (TRAINED, EXPORTED)}
    edit_params(pipeline_copy, train={"learning_rate": 0.002})
    status = dvc(pipeline_copy, "status").stdout
    assert re.search(r"^train:\n(\s+.*\n)*?\s+modified:\s+train$", status, re.M), status
    assert not re.search(r"^(download|preprocess):", status, re.M), status
    assert re.search(r"^validate:", status, re.M), status  # it checks every params edit
    start = time.perf_counter()
    result = dvc(pipeline_copy, "repro")
    changed_s = time.perf_counter() - start
    assert stages_run(result.stdout) == ["validate", "train", "evaluate", "export"]

    (pipeline_copy / "params.yaml").write_text(first)
    start = time.perf_counter()
    back = dvc(pipeline_copy, "repro")
    back_s = time.perf_counter() - start
    assert stages_run(back.stdout) == ["validate"], back.stdout  # validate has no outs to cache
    for stage in ("train", "evaluate", "export"):
        assert f"Stage '{stage}' is cached - skipping run" in back.stdout, back.stdout
    assert {out: (pipeline_copy / out).read_bytes() for out in weights} == weights
    assert "up to date" in dvc(pipeline_copy, "status").stdout
    print(f"dvc repro: {changed_s:.1f} s after the change, {back_s:.1f} s going back")
    assert back_s < changed_s


def test_stage_help_starts_with_its_command() -> None:
    result = run(["python", "-m", "stages.train", "--help"], REPO, tool_env())
    assert "python -m stages.train" in result.stdout and "--params" in result.stdout


def lock_outs(lock_text: str) -> dict[str, str]:
    stages = yaml.safe_load(lock_text)["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])}


@pytest.mark.slow
def test_a_fresh_default_run_reproduces_the_committed_lock(
    tmp_path: Path, real_mirror: Path
) -> None:
    """The full default pipeline gives, byte for byte, the dvc.lock in git, on whatever CPU runs
    the tests: the second pin of portable numerics (tests/test_numerics.py holds the first)."""
    repo = copy_repo(tmp_path / "repo")
    committed = (repo / "dvc.lock").read_text()
    dvc(repo, "repro", FMNIST_MIRROR=str(real_mirror))
    fresh = (repo / "dvc.lock").read_text()
    differing = {
        path: (md5, lock_outs(fresh).get(path))
        for path, md5 in lock_outs(committed).items()
        if lock_outs(fresh).get(path) != md5
    }
    assert not differing, (
        f"outs that differ from the committed dvc.lock (committed, now): {differing}"
    )
    assert fresh == committed
