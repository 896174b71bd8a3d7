"""python -m flows.sweep --set train.learning_rate=0.05,0.1 --set train.batch_size=128,256

A parameter sweep as one Prefect flow, `fashion-mnist-sweep`: every combination of the --set
values (their cartesian product) runs as a DVC experiment, one after another, each a Prefect
task run named after its combination:

    dvc exp run --temp --name <sweep>-<n> -S train.learning_rate=0.05 -S train.batch_size=128

--set takes what `dvc exp run -S` takes (Hydra's override syntax): `KEY=V1,V2` sweeps a key,
`KEY=[8,16]` is one list value, `KEY=range(1,4)` and `KEY=choice(a,b)` work too. Before anything
runs, each key must exist in params.yaml and every combination must pass the checks every stage
makes (stages/config.py); otherwise the sweep stops with one `error:` line and exit code 2.

Each experiment runs in a temporary copy of the repository (`--temp`): your params.yaml,
dvc.lock and outs are never touched, not even by a sweep that fails or is stopped. The
experiments start from your workspace as `dvc exp run` sees it: the last commit plus uncommitted
edits of tracked files (untracked files are left out).

At the end the leaderboard (one row per experiment, best test accuracy first) is printed,
published as the Prefect table artifact `sweep-leaderboard` and written to sweeps/<sweep>.csv,
and the best experiment is named with the command that takes it into the workspace:
`dvc exp apply <sweep>-<n>`. `dvc exp show` lists every experiment that succeeded. An experiment
that fails is a `failed` row with its error; the others still run, and the sweep exits 1.

The Prefect server is PREFECT_API_URL's, checked before the sweep; without one, a temporary
server of its own, as for `python -m flows.pipeline`. docs/experiments.md has examples.
"""

from __future__ import annotations

import argparse

from flows.cli import BAD_ARGUMENTS, sweep_args

if __name__ == "__main__":  # --help and a bad argument answer before DVC and Prefect load
    ARGS = sweep_args(__doc__)

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps, to_hydra_overrides
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import HydraException
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from prefect.states import Failed, State
from ruamel.yaml import YAML

from flows.dvc_lock import require_writable_checkout
from flows.prefect_server import ServerWatch, flow_server, report_end, stop_server
from stages.config import EVAL_DIR, LIVE_DIR, PARAMS_FILE, ParamsError, load_params
from stages.errors import StageError
from stages.runtime import prefect_api_url, require_prefect_server
from stages.signals import StageStopped, stop_on_signals

FLOW_NAME = "fashion-mnist-sweep"
ARTIFACT_KEY = "sweep-leaderboard"
SWEEPS_DIR = Path("sweeps")  # git-ignored, so no experiment ever carries a leaderboard
TEST_METRICS = EVAL_DIR / "metrics.json"
TRAIN_METRICS = LIVE_DIR / "metrics.json"
OUTPUT_LINES_KEPT = 200  # of an experiment's output, searched for its error when it fails
INTERRUPT_WAIT_S = 20.0  # for `dvc exp run` to stop on SIGINT and remove its temporary copy


class SweepArgumentError(StageError):
    """A --set or --name that cannot run; found before any experiment starts."""


@dataclass(frozen=True)
class Combination:
    name: str  # the experiment's name: <sweep>-<n>
    overrides: tuple[str, ...]  # what `dvc exp run -S` gets, e.g. "train.learning_rate=0.05"

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


@dataclass(frozen=True)
class ExperimentRun:
    name: str
    label: str
    seconds: float
    error: str | None = None  # None: `dvc exp run` succeeded


@dataclass(frozen=True)
class Plan:
    sweep: str
    keys: tuple[str, ...]  # the --set keys, in the order given: the leaderboard's columns
    combinations: tuple[Combination, ...]


# --- The plan: every combination, checked before anything runs -----------------------------


def parse_setting(setting: str) -> Override:
    """One --set as Hydra (and so `dvc exp run -S`) reads it, refused unless it changes a key."""
    key, sep, _ = setting.partition("=")
    if not sep or not key.strip():
        raise SweepArgumentError(f"--set {setting}: expected SECTION.KEY=VALUE[,VALUE...]")
    if ":" in key:
        raise SweepArgumentError(
            f"--set {setting}: only params.yaml keys can be set; write SECTION.KEY=VALUE"
        )
    try:
        [override] = to_hydra_overrides([setting])
    except HydraException as exc:
        reason = str(exc).splitlines()[0]
        raise SweepArgumentError(f"--set {setting}: not a value DVC can read ({reason})") from None
    if override.type != OverrideType.CHANGE or override.package is not None:
        # `+key` would add a key no stage reads, `~key` silently put back a default.
        raise SweepArgumentError(f"--set {setting}: only changes to existing keys are allowed")
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        raise SweepArgumentError(f"--set {setting}: glob() sweeps are not supported by DVC")
    return override


def require_key(raw: dict[str, Any], key: str, setting: str) -> None:
    """Fails, naming the keys there are, unless `key` (dotted) is in params.yaml as written."""
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "params.yaml's top level"
        if not isinstance(node, dict):
            raise SweepArgumentError(f"--set {setting}: {where} is a value, not a section")
        if part not in node:
            raise SweepArgumentError(
                f"--set {setting}: params.yaml has no key {key}; "
                f"keys in {where}: {', '.join(map(str, node))}"
            )
        node = node[part]
    if isinstance(node, dict):
        raise SweepArgumentError(
            f"--set {setting}: {key} is a section; set one of its keys ({', '.join(node)})"
        )


def one_line(exc: ParamsError, params_path: Path) -> str:
    """A ParamsError's problems on one line, without the temporary file's name."""
    lines = [line.strip() for line in str(exc).splitlines()]
    problems = lines[1:] or [lines[0].replace(str(params_path), str(PARAMS_FILE))]
    return "; ".join(problems)


def check_combination(params_text: str, combination: Combination, folder: Path) -> None:
    """Applies the combination to a copy of params.yaml as `dvc exp run -S` will, and checks the
    result as the stages will (stages/config.py): a bad combination stops the sweep before any
    experiment runs, not as a failed experiment later."""
    path = folder / PARAMS_FILE.name
    path.write_text(params_text, encoding="utf-8")
    try:
        apply_overrides(str(path), list(combination.overrides))
        load_params(path)
    except DvcException as exc:
        cause = f": {str(exc.__cause__).splitlines()[0]}" if exc.__cause__ else ""
        raise SweepArgumentError(
            f"{combination.name} ({combination.label}): DVC cannot apply it: {exc}{cause}"
        ) from None
    except ParamsError as exc:
        raise SweepArgumentError(
            f"{combination.name} ({combination.label}) would fail: {one_line(exc, path)}"
        ) from None


def make_plan(params_path: Path, settings: Sequence[str], sweep: str) -> Plan:
    """Every combination of the --set values, named and checked; SweepArgumentError if any
    --set or combination is bad."""
    params_text = params_path.read_text(encoding="utf-8")
    load_params(params_path)  # a params.yaml that is bad already is named as such
    raw = YAML(typ="safe").load(params_text) or {}
    keys: list[str] = []
    for setting in settings:
        key = parse_setting(setting).key_or_group
        if key in keys:
            raise SweepArgumentError(f"--set {setting}: {key} is set twice; give one --set per key")
        require_key(raw, key, setting)
        keys.append(key)
    sweeps = get_hydra_sweeps({str(PARAMS_FILE): list(settings)})
    combinations = tuple(
        Combination(f"{sweep}-{n}", tuple(overrides[str(PARAMS_FILE)]))
        for n, overrides in enumerate(sweeps, 1)
    )
    with tempfile.TemporaryDirectory(prefix="sweep-check-") as folder:
        for combination in combinations:
            check_combination(params_text, combination, Path(folder))
    return Plan(sweep, tuple(keys), combinations)


def override_values(combination: Combination) -> dict[str, Any]:
    """Each key's value in this combination, typed as DVC writes it into params.yaml."""
    return {o.key_or_group: o.value() for o in to_hydra_overrides(list(combination.overrides))}


# --- Running: DVC's own `dvc exp run`, one experiment at a time -----------------------------


def dvc_command() -> list[str]:
    """The venv's dvc, beside this Python; else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if found is None:
        raise StageError("dvc is not installed beside this Python or on PATH")
    return [found]


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml runs `python -m stages.<name>`: the venv's python, as `make pipeline` has it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The stages run as plain processes: their output is this sweep's task run's log already,
    # and a stage that registered a task run of its own would do so outside any flow run.
    env["PREFECT_API_URL"] = ""
    return env


def run_dvc(root: Path, *args: str) -> str:
    """Runs a quick dvc command to its end; its stdout, or StageError with its error."""
    result = subprocess.run(
        [*dvc_command(), *args], cwd=root, env=dvc_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise StageError(f"dvc {' '.join(args)} exited {result.returncode}: {lines[-1]}")
    return result.stdout


def require_commit(root: Path) -> None:
    """`dvc exp` records each experiment against a commit; without one it fails with a
    traceback-like message, so this says what to do instead."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SweepArgumentError(
            f"{root} is not a git repository with a commit, which DVC experiments need: "
            "git init && git add -A && git commit -m 'baseline'"
        )


def require_new_names(root: Path, plan: Plan) -> None:
    taken = set(run_dvc(root, "exp", "list", "--name-only").split())
    clash = [c.name for c in plan.combinations if c.name in taken]
    if clash:
        raise SweepArgumentError(
            f"experiments {', '.join(clash)} exist already; pick another --name "
            f"(or remove them: dvc exp remove {' '.join(clash)})"
        )


def failure_reason(lines: Sequence[str], returncode: int) -> str:
    """The stage's own `error:` line when there is one (the cause), else DVC's `ERROR:` line."""
    for prefix in ("error:", "ERROR:"):
        found = [line.strip() for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix(prefix).strip()
    return f"dvc exp run exited {returncode}"


def stop_experiment(process: subprocess.Popen) -> None:
    """Ctrl-C, as a terminal would send it, so that DVC removes its temporary copy; then
    SIGTERM and SIGKILL if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(INTERRUPT_WAIT_S)
    stop_server(process)


@task(cache_policy=NONE, persist_result=False)
def run_experiment(root: Path, combination: Combination) -> ExperimentRun | State:
    """`dvc exp run --temp` for one combination; a Failed state holding the run if it fails.

    A state rather than an exception: a failed experiment is an outcome the sweep reports, not a
    bug, so its log shows its error line without a Python traceback.
    """
    logger = get_run_logger()
    command = [*dvc_command(), "exp", "run", "--temp", "--name", combination.name]
    for override in combination.overrides:
        command += ["-S", override]
    logger.info("%s", " ".join(command[1:]))
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
    process = subprocess.Popen(
        command,
        cwd=root,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its own session: a stop reaches it from here, after this run has recorded it.
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            logger.info("%s", line.rstrip())
        process.wait()
    finally:
        if process.poll() is None:
            stop_experiment(process)
    seconds = round(time.perf_counter() - start, 1)
    if process.returncode != 0:
        error = failure_reason(list(tail), process.returncode)
        run = ExperimentRun(combination.name, combination.label, seconds, error)
        return Failed(message=f"{combination.name}: {error}", data=run)
    return ExperimentRun(combination.name, combination.label, seconds)


def run_all(root: Path, plan: Plan) -> list[ExperimentRun]:
    """Every combination in turn (DVC's queue misbehaves with parallel workers); a failed one
    is recorded and the next one runs."""
    runs = []
    for combination in plan.combinations:
        # A callable name: Prefect would format a string name with the task's arguments.
        label = combination.label
        state = run_experiment.with_options(task_run_name=lambda label=label: label)(
            root, combination, return_state=True
        )
        result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):  # a bug, or no dvc: the next would fail alike
            raise result
        runs.append(result)
    return runs


# --- The leaderboard -----------------------------------------------------------------------


def recorded_experiments(root: Path) -> dict[str, dict[str, Any]]:
    """Each experiment of HEAD's baseline by name: what `dvc exp show --json` records for it."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in json.loads(run_dvc(root, "exp", "show", "--json")):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev.get("data") or {}
    return found


def metric(data: dict[str, Any], path: Path, *keys: str) -> float | None:
    node: Any = (data.get("metrics") or {}).get(str(path), {}).get("data")
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    is_number = isinstance(node, int | float) and not isinstance(node, bool)
    return float(node) if is_number else None


def leaderboard_row(
    plan: Plan, combination: Combination, run: ExperimentRun, recorded: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    data = recorded.get(run.name)
    error = run.error
    if error is None and data is None:
        error = "dvc exp run succeeded, but `dvc exp show` does not list it"
    data = data or {}
    values = override_values(combination)
    return {
        "experiment": run.name,
        "status": "failed" if error else "ok",
        **{key: values[key] for key in plan.keys},
        "test_accuracy": metric(data, TEST_METRICS, "accuracy"),
        "test_loss": metric(data, TEST_METRICS, "loss"),
        "val_accuracy": metric(data, TRAIN_METRICS, "val", "accuracy"),
        "seconds": run.seconds,
        "error": error or "",
    }


def leaderboard(
    plan: Plan, runs: Sequence[ExperimentRun], recorded: dict[str, dict[str, Any]]
) -> pd.DataFrame:
    """One row per experiment, best first: succeeded before failed, then by test accuracy
    (higher first), then test loss (lower first)."""
    rows = [
        leaderboard_row(plan, c, r, recorded) for c, r in zip(plan.combinations, runs, strict=True)
    ]
    board = pd.DataFrame(rows)
    metrics = ["test_accuracy", "test_loss", "val_accuracy"]
    board[metrics] = board[metrics].astype(float)  # a missing metric is NaN, even in every row
    board["_failed"] = board["status"] != "ok"
    board = board.sort_values(
        ["_failed", "test_accuracy", "test_loss", "experiment"],
        ascending=[True, False, True, True],
        na_position="last",
        kind="stable",
    ).drop(columns="_failed")
    board.insert(0, "rank", range(1, len(board) + 1))
    return board.reset_index(drop=True)


def records(board: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as JSON-safe dicts: a missing metric is None (NaN is not JSON)."""

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    return [{k: clean(v) for k, v in row.items()} for row in board.to_dict(orient="records")]


def write_csv(board: pd.DataFrame, path: Path) -> None:
    """Whole or not at all: a stopped sweep leaves no half-written leaderboard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    board.to_csv(tmp, index=False)
    os.replace(tmp, path)


def best_line(board: pd.DataFrame) -> str:
    best = board.iloc[0]
    if best["status"] != "ok":
        return "best: none (every experiment failed)"
    return (
        f"best: {best['experiment']} (test accuracy {best['test_accuracy']:.4f}); "
        f"take it into the workspace with: dvc exp apply {best['experiment']}"
    )


def failures_message(board: pd.DataFrame) -> str:
    failed = board[board["status"] != "ok"]
    each = "; ".join(f"{row.experiment}: {row.error}" for row in failed.itertuples())
    return f"{len(failed)} of {len(board)} experiments failed ({each})"


# --- The flow ------------------------------------------------------------------------------


@flow(name=FLOW_NAME)
def sweep(plan: Plan) -> list[dict[str, Any]] | State:
    """Runs every combination of the plan as a DVC experiment, in turn, and publishes the
    leaderboard (its rows, best first); a Failed state once all have run, if any failed."""
    logger = get_run_logger()
    logger.info("flow run id %s", flow_run.id)
    root = Path(Repo.find_root())
    logger.info("sweep %s: %d experiments", plan.sweep, len(plan.combinations))
    runs = run_all(root, plan)
    recorded = recorded_experiments(root) if any(r.error is None for r in runs) else {}
    board = leaderboard(plan, runs, recorded)
    csv_path = root / SWEEPS_DIR / f"{plan.sweep}.csv"
    write_csv(board, csv_path)
    best = best_line(board)
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=records(board),
        description=f"Sweep `{plan.sweep}`, best first ({csv_path.relative_to(root)}). {best}",
    )
    print(board.to_string(index=False))
    print(f"leaderboard: {csv_path.relative_to(root)}")
    print(best, flush=True)
    logger.info("%s", best)
    if (board["status"] != "ok").any():
        return Failed(message=failures_message(board), data=records(board))
    return records(board)


def main(argv: list[str] | None = None) -> int:
    return run(sweep_args(__doc__, argv))


def prepare(args: argparse.Namespace) -> tuple[Path, Plan]:
    """Everything checked before a server starts or an experiment runs."""
    root = Path(Repo.find_root())
    plan = make_plan(root / PARAMS_FILE, args.settings, args.name)
    require_commit(root)
    require_writable_checkout(root)
    require_new_names(root, plan)
    return root, plan


def run(args: argparse.Namespace) -> int:
    # Like a flow run: started by a shell or scheduler, it must outlive a shell that exits.
    stop_on_signals(parent_death=False)
    watch: ServerWatch | None = None
    try:
        _, plan = prepare(args)
        if args.dry_run:
            for combination in plan.combinations:
                print(f"{combination.name}: {combination.label}")
            return 0
        url = prefect_api_url()
        if url:
            require_prefect_server(url)
        with flow_server(url) as watch:
            state = sweep(plan, return_state=True)
            outcome = state.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                raise outcome
    except (StageStopped, Exception) as exc:
        return report(exc, watch)
    if state.is_failed():  # experiments failed; the others ran and are on the leaderboard
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    return 0


KEPT = (
    "experiments that finished are in `dvc exp show`; the workspace was not touched "
    "(each experiment runs in a temporary copy)"
)


def report(exc: BaseException, watch: ServerWatch | None) -> int:
    """Prints the one `error:` line for why the sweep ended early or failed; its exit code."""
    if isinstance(exc, SweepArgumentError) and not (watch is not None and watch.gone):
        print(f"error: {exc}", file=sys.stderr)
        return BAD_ARGUMENTS
    return report_end(exc, watch, FLOW_NAME, KEPT)


if __name__ == "__main__":
    raise SystemExit(run(ARGS))
