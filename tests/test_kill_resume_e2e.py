"""SIGKILL at random moments, SIGTERM, resume, and two runners at once, with the real `dvc repro`.

Set KILL_SEED to replay a given sequence of kill moments.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from stages.artifacts import file_digest

from .helpers.repo import SMALL, clone_pipeline, copy_repo, edit_params
from .helpers.runner import Runner
from .helpers.tools import dvc, run, stages_run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGES = ["download", "preprocess", "train", "evaluate", "export"]
# Roughly how long each stage works after logging "starting" on this 2-core machine, with the
# small params: kills are drawn uniformly inside this window.
WORK_S = {"download": 1.0, "preprocess": 2.0, "train": 4.0, "evaluate": 2.0, "export": 1.0}
CHECKPOINT = Path("models/checkpoints/train.pt")
FIRST_RUN_KILLS = {"train": 2}  # twice for train: a resume of a resumed run
# A kill while a forced rerun replaces outs the stage already has: the stages with most to lose.
FORCED_RERUN_KILLS = ("train", "evaluate", "export")
LEFTOVER = re.compile(r"^\.[\w.-]+\.\d+\.\w+\.tmp$")  # stages/artifacts.py's temporary names


def outs_by_stage(repo: Path) -> dict[str, list]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: stage.get("outs", []) for name, stage in lock.items()}


# Two epochs, a checkpoint every 100 batches: the run the kill tests interrupt.
CHANGED = {"train": {"epochs": 2, "checkpoint_every_steps": 100, "learning_rate": 0.05}}


@pytest.fixture(scope="module")
def unbroken(pipeline: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reproduced pipeline after `dvc repro train` with CHANGED, uninterrupted; read only."""
    repo = clone_pipeline(pipeline[0], tmp_path_factory.mktemp("unbroken") / "repo")
    edit_params(repo, **CHANGED)
    dvc(repo, "repro", "train")
    return repo


@pytest.mark.parametrize("resume_with", ["dvc repro", "flow"])
def test_train_killed_mid_epoch_resumes_to_the_same_weights(
    pipeline: tuple[Path, str],
    unbroken: Path,
    tmp_path: Path,
    resume_with: str,
    request: pytest.FixtureRequest,
) -> None:
    killed = clone_pipeline(pipeline[0], tmp_path / "killed")
    edit_params(killed, **CHANGED)

    runner = Runner(killed, "train")
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT).exists():  # the first checkpoint: 100 batches in
        assert runner.process.poll() is None, runner.output
        assert time.monotonic() < deadline, runner.output
        time.sleep(0.02)
    time.sleep(random.Random(os.environ.get("KILL_SEED", "0")).uniform(0.0, 1.0))
    assert runner.kill(), "train finished before the kill"
    position = torch.load(killed / CHECKPOINT, weights_only=True)
    if resume_with == "dvc repro":
        resumed = dvc(killed, "repro", "train")
    else:
        api = request.getfixturevalue("prefect_server")
        resumed = run(
            ["python", "-m", "flows.pipeline", "--target", "train"],
            killed,
            tool_env(PREFECT_API_URL=api),
        )
    output = resumed.stdout + resumed.stderr
    assert "resuming from models/checkpoints/train.pt: epoch " in output
    assert f"epoch {position['epoch']}, batch {len(position['record']['sizes'])}" in output
    weights = "models/train/model_weights.pth"
    for name, repo in (("unbroken", unbroken), ("killed and resumed", killed)):
        print(f"{resume_with}, {name}: {weights} sha256 {file_digest(repo / weights, 'sha256')}")
    assert (killed / weights).read_bytes() == (unbroken / weights).read_bytes()
    assert (killed / "dvc.lock").read_bytes() == (unbroken / "dvc.lock").read_bytes()
    assert not (killed / CHECKPOINT).exists()


def test_sigterm_to_dvc_repro_stops_its_stage_and_the_next_run_resumes(
    pipeline: tuple[Path, str], tmp_path: Path
) -> None:
    """DVC does not pass a SIGTERM on to the stage it runs; the stage notices dvc die
    (PR_SET_PDEATHSIG, or a watch past the shell), stops without writing outs, and keeps its
    checkpoint."""
    repo = clone_pipeline(pipeline[0], tmp_path / "repo")
    edit_params(repo, train={"epochs": 3, "learning_rate": 0.06})
    before = outs_by_stage(repo)["train"]
    weights = (repo / "models/train/model_weights.pth").read_bytes()
    # DVC runs a stage as `$SHELL -c CMD`. bash becomes CMD, but dash (/bin/sh, which DVC uses
    # where SHELL is unset, as under cron) forks it: the stage's parent is then a shell that
    # outlives dvc. The harder case; tests/test_signals.py has the stage as dvc's own child.
    runner = Runner(repo, "train", SHELL="/bin/sh")
    assert runner.wait_for("epoch 2/3"), runner.output  # epoch 1's checkpoint is saved by then
    stage = runner.stage_process("train")
    runner.process.send_signal(signal.SIGTERM)  # to dvc alone, as a service manager would
    runner.finish()
    deadline = time.monotonic() + 10
    while stage.is_running() and stage.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the stage outlived dvc repro:\n{runner.output}"
        time.sleep(0.05)
    assert outs_by_stage(repo)["train"] == before
    assert (repo / "models/train/model_weights.pth").read_bytes() == weights, "train finished"
    assert (repo / CHECKPOINT).is_file()
    resumed = dvc(repo, "repro", "train")
    assert "resuming from models/checkpoints/train.pt: epoch " in resumed.stdout + resumed.stderr


def test_sigkill_at_random_moments_in_every_stage_loses_nothing(
    pipeline: tuple[Path, str], tmp_path: Path, real_mirror: Path
) -> None:
    """Each stage is killed on its first run (so it has no outs yet; train twice), and train,
    evaluate and export also while a forced rerun replaces outs they already have. After every
    kill dvc.lock and the cache are intact: `dvc repro` finishes with the unbroken run's
    hashes, and after a killed rerun it takes the outs from its run-cache without running the
    stage. A killed writer's temporaries may stay (git ignores them) until that out is next
    written."""
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    expected = outs_by_stage(pipeline[0])
    repo = copy_repo(tmp_path / "repo")
    edit_params(repo, **SMALL)
    mirror = {"FMNIST_MIRROR": str(real_mirror)}
    kills: list[str] = []
    for stage in STAGES:
        for _ in range(FIRST_RUN_KILLS.get(stage, 1)):
            runner = Runner(repo, stage, **mirror)
            assert runner.wait_for(f"{stage}: starting"), runner.output
            time.sleep(rng.uniform(0, WORK_S[stage]))
            if runner.kill_stage(stage):
                kills.append(stage)
        finished = dvc(repo, "repro", stage, **mirror)
        assert stage in stages_run(finished.stdout) or "didn't change" in finished.stdout
        assert outs_by_stage(repo)[stage] == expected[stage]

        if stage not in FORCED_RERUN_KILLS:
            continue
        runner = Runner(repo, "--force", "--single-item", stage, **mirror)
        assert runner.wait_for(f"{stage}: starting"), runner.output
        time.sleep(rng.uniform(0, WORK_S[stage]))
        if runner.kill_stage(stage):
            kills.append(f"{stage} (forced rerun)")
        assert outs_by_stage(repo)[stage] == expected[stage]
        # DVC removed the outs before the rerun; after a SIGKILL its run-cache brings them back.
        restored = dvc(repo, "repro", stage, **mirror)
        assert stage not in stages_run(restored.stdout), restored.stdout
        # The final `dvc status` checks every restored out against dvc.lock.
    final = dvc(repo, "repro", **mirror)
    assert outs_by_stage(repo) == expected
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout, final.stdout
    leftovers = [p for p in repo.rglob("*.tmp") if ".dvc" not in p.parts]
    assert all(LEFTOVER.match(p.name) for p in leftovers), leftovers
    ignored = subprocess.run(
        ["git", "check-ignore", *map(str, leftovers)], cwd=repo, capture_output=True, text=True
    ).stdout.split()
    assert len(ignored) == len(leftovers), leftovers
    print(f"kills ({len(kills)}): {', '.join(kills)}")
    assert len(kills) >= 6, kills  # most draws land inside the stage's work


def test_a_second_dvc_repro_fails_fast_with_busy(pipeline_copy: Path) -> None:
    edit_params(pipeline_copy, train={"learning_rate": 0.05})
    first = Runner(pipeline_copy)
    assert first.wait_for("train: starting"), first.output
    started = time.monotonic()
    second = dvc(pipeline_copy, "repro", check=False)
    waited = time.monotonic() - started
    assert second.returncode != 0
    assert "is busy" in second.stderr, second.stderr
    assert waited < 15
    assert first.finish() == 0, first.output
    assert "Data and pipelines are up to date" in dvc(pipeline_copy, "status").stdout
