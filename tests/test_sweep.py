"""`python -m flows.sweep`: its command line, the plan it checks before running, its leaderboard.

No experiment runs here; tests/test_sweep_e2e.py runs real ones.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows import sweep
from flows.sweep import Combination, ExperimentRun, Plan, SweepArgumentError

from .helpers.tools import REPO, tool_env


@pytest.fixture
def params_path(tmp_path: Path) -> Path:
    """The project's params.yaml, in a folder DVC takes for a repository root."""
    (tmp_path / ".dvc").mkdir()
    return Path(shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml"))


def run_sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.sweep", *args],
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_answers_before_dvc_and_prefect_load(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows.sweep", "--help"],
        cwd=REPO,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m flows.sweep")
    assert "python -m flows.sweep --set train.learning_rate=0.05,0.1" in result.stdout
    for option in ("--set", "--name", "--dry-run"):
        assert option in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not {name for name in imported if name.split(".")[0] in ("dvc", "prefect", "torch")}


def test_set_is_required() -> None:
    with pytest.raises(SystemExit) as exit_info:
        sweep.sweep_args(None, [])
    assert exit_info.value.code == 2


def test_default_name_is_a_utc_timestamp() -> None:
    args = sweep.sweep_args(None, ["--set", "train.epochs=1"])
    assert re.fullmatch(r"sweep-\d{8}-\d{6}", args.name)
    assert args.settings == ["train.epochs=1"] and not args.dry_run


@pytest.mark.parametrize("name", ["1st", "a/b", "a..b", "a b", "", "x" * 61])
def test_a_name_that_is_no_git_ref_is_refused(name: str) -> None:
    with pytest.raises(SystemExit):
        sweep.sweep_args(None, ["--set", "train.epochs=1", "--name", name])


def test_the_plan_is_the_cartesian_product_in_order(params_path: Path) -> None:
    settings = ["train.learning_rate=0.05,0.1", "train.batch_size=128,256"]
    plan = sweep.make_plan(params_path, settings, "s")
    assert plan.keys == ("train.learning_rate", "train.batch_size")
    assert [(c.name, c.label) for c in plan.combinations] == [
        ("s-1", "train.learning_rate=0.05 train.batch_size=128"),
        ("s-2", "train.learning_rate=0.05 train.batch_size=256"),
        ("s-3", "train.learning_rate=0.1 train.batch_size=128"),
        ("s-4", "train.learning_rate=0.1 train.batch_size=256"),
    ]
    values = sweep.override_values(plan.combinations[3])
    assert values == {"train.learning_rate": 0.1, "train.batch_size": 256}
    assert isinstance(values["train.batch_size"], int)


def test_values_read_as_dvc_exp_run_reads_them(params_path: Path) -> None:
    settings = ["train.hidden_sizes=[64,32],[128]", "train.optimizer=adam", "seed=range(1,3)"]
    plan = sweep.make_plan(params_path, settings, "s")
    assert [sweep.override_values(c) for c in plan.combinations] == [
        {"train.hidden_sizes": [64, 32], "train.optimizer": "adam", "seed": 1},
        {"train.hidden_sizes": [64, 32], "train.optimizer": "adam", "seed": 2},
        {"train.hidden_sizes": [128], "train.optimizer": "adam", "seed": 1},
        {"train.hidden_sizes": [128], "train.optimizer": "adam", "seed": 2},
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["train.lerning_rate=0.1"], "params.yaml has no key train.lerning_rate; keys in train:"),
        (["trian.epochs=1"], "params.yaml has no key trian.epochs; keys in params.yaml's top"),
        (["train=1"], "train is a section; set one of its keys"),
        (["seed.x=1"], "seed is a value, not a section"),
        (["noequals"], "expected SECTION.KEY=VALUE"),
        (["=1"], "expected SECTION.KEY=VALUE"),
        (["train.learning_rate=0.05,"], "not a value DVC can read"),
        (["train.hidden_sizes=[1,"], "not a value DVC can read"),
        (["+train.extra=1"], "only changes to existing keys are allowed"),
        (["other.yaml:train.epochs=1"], "only params.yaml keys can be set"),
        (["train.learning_rate=glob(*)"], "glob() sweeps are not supported"),
        (["train.epochs=1", "train.epochs=2"], "train.epochs is set twice"),
        (["train.learning_rate=-1"], "s-1 (train.learning_rate=-1) would fail: "),
        (["train.batch_size=abc"], "train.batch_size = 'abc': Input should be a valid integer"),
        (["train.epochs=1.5"], "train.epochs = 1.5: Input should be a valid integer"),
        (
            ["train.optimizer=adam,sgdd", "train.epochs=1,2"],
            "s-3 (train.optimizer=sgdd train.epochs=1) would fail: train.optimizer = 'sgdd'",
        ),
        (["preprocess.mean=0.3"], "set both mean and std"),
    ],
)
def test_a_bad_setting_is_refused_before_anything_runs(
    params_path: Path, settings: list[str], message: str
) -> None:
    before = params_path.read_bytes()
    with pytest.raises(SweepArgumentError) as error:
        sweep.make_plan(params_path, settings, "s")
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert str(params_path.parent) not in str(error.value)  # not the temporary copy's path
    assert params_path.read_bytes() == before


def test_the_command_line_says_what_is_wrong_in_one_line(params_path: Path) -> None:
    result = run_sweep(params_path.parent, "--set", "train.learning_rate=0.05,-1")
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(
        r"error: sweep-\d{8}-\d{6}-2 \(train\.learning_rate=-1\) would fail: "
        r"train\.learning_rate = -1: Input should be greater than 0\n",
        result.stderr,
    ), result.stderr


def test_dry_run_lists_the_experiments_and_runs_nothing(params_path: Path) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "params"]):
        subprocess.run(git + cmd, cwd=params_path.parent, check=True, capture_output=True)
    result = run_sweep(
        params_path.parent, "--set", "train.epochs=1,2", "--name", "try", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["try-1: train.epochs=1", "try-2: train.epochs=2"]


def test_experiments_need_a_git_commit(params_path: Path) -> None:
    result = run_sweep(params_path.parent, "--set", "train.epochs=1")
    assert result.returncode == 2
    assert "not a git repository with a commit" in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def plan_of(*labels: str) -> Plan:
    combinations = tuple(Combination(f"s-{n}", (label,)) for n, label in enumerate(labels, 1))
    return Plan("s", ("train.learning_rate",), combinations)


def recorded(accuracy: float, loss: float, val_accuracy: float | None = None) -> dict:
    metrics = {"reports/evaluate/metrics.json": {"data": {"accuracy": accuracy, "loss": loss}}}
    if val_accuracy is not None:
        metrics["reports/train/metrics.json"] = {"data": {"val": {"accuracy": val_accuracy}}}
    return {"metrics": metrics}


def test_the_leaderboard_puts_the_best_first_and_failures_last() -> None:
    plan = plan_of(*(f"train.learning_rate={lr}" for lr in (0.01, 0.05, 0.1, 100)))
    runs = [
        ExperimentRun("s-1", "", 10.0),
        ExperimentRun("s-2", "", 11.0),
        ExperimentRun("s-3", "", 12.0),
        ExperimentRun("s-4", "", 3.0, "train: loss is not finite"),
    ]
    board = sweep.leaderboard(
        plan,
        runs,
        {
            "s-1": recorded(0.80, 0.6, 0.81),
            "s-2": recorded(0.86, 0.5, 0.87),
            "s-3": recorded(0.86, 0.4),  # the same accuracy as s-2, a lower loss
        },
    )
    assert list(board.columns) == [
        "rank",
        "experiment",
        "status",
        "train.learning_rate",
        "test_accuracy",
        "test_loss",
        "val_accuracy",
        "seconds",
        "error",
    ]
    assert list(board["experiment"]) == ["s-3", "s-2", "s-1", "s-4"]
    assert list(board["rank"]) == [1, 2, 3, 4]
    assert list(board["status"]) == ["ok", "ok", "ok", "failed"]
    assert list(board["train.learning_rate"]) == [0.1, 0.05, 0.01, 100]
    assert board.loc[3, "error"] == "train: loss is not finite"
    rows = sweep.records(board)
    assert rows[0]["val_accuracy"] is None and rows[3]["test_accuracy"] is None
    assert rows[1]["val_accuracy"] == 0.87
    assert sweep.best_line(board) == (
        "best: s-3 (test accuracy 0.8600); take it into the workspace with: dvc exp apply s-3"
    )
    assert sweep.failures_message(board) == (
        "1 of 4 experiments failed (s-4: train: loss is not finite)"
    )


def test_an_experiment_dvc_does_not_list_is_a_failure() -> None:
    board = sweep.leaderboard(
        plan_of("train.learning_rate=0.1"), [ExperimentRun("s-1", "", 1.0)], {}
    )
    assert board.loc[0, "status"] == "failed"
    assert "does not list it" in board.loc[0, "error"]
    assert math.isnan(board.loc[0, "test_accuracy"])
    assert sweep.best_line(board) == "best: none (every experiment failed)"


def test_the_leaderboard_csv_is_written_whole(tmp_path: Path) -> None:
    board = sweep.leaderboard(
        plan_of("train.learning_rate=0.1"),
        [ExperimentRun("s-1", "", 1.5)],
        {"s-1": recorded(0.9, 0.3)},
    )
    path = tmp_path / "sweeps" / "s.csv"
    sweep.write_csv(board, path)
    assert path.read_text().splitlines() == [
        "rank,experiment,status,train.learning_rate,test_accuracy,test_loss,val_accuracy,seconds,"
        "error",
        "1,s-1,ok,0.1,0.9,0.3,,1.5,",
    ]
    assert [p.name for p in path.parent.iterdir()] == ["s.csv"]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (
            [
                "error: train: device = 'mps': MPS is not available on this machine",
                "ERROR: failed to reproduce 'train': failed to run: python -m stages.train",
            ],
            "train: device = 'mps': MPS is not available on this machine",
        ),
        (["ERROR: Experiment conflicts with existing experiment 's-1'."], "Experiment conflicts"),
        (["something else"], "dvc exp run exited 255"),
    ],
)
def test_a_failed_experiment_is_named_by_its_cause(lines: list[str], reason: str) -> None:
    assert sweep.failure_reason(lines, 255).startswith(reason)
