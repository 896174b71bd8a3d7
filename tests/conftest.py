"""Fixtures: tiny synthetic IDX files for unit tests, the real data for end-to-end tests.

Helpers (functions, constants) live in tests/helpers/; this file holds fixtures and hooks only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.config import Params, parse_params

from .helpers.data import TINY_PARAMS, write_mirror
from .helpers.mirror import RealMirror, find_real_mirror
from .helpers.prefect import running_server
from .helpers.repo import SMALL, clone_pipeline, copy_repo, edit_params
from .helpers.tools import dvc

REAL_MIRROR = pytest.StashKey[RealMirror]()


@pytest.fixture
def synthetic_mirror(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A folder with the four raw files (120 train, 40 test images) and their md5s."""
    folder = tmp_path / "mirror"
    return folder, write_mirror(folder)


@pytest.fixture
def raw_dir(synthetic_mirror: tuple[Path, list[tuple[str, str]]]) -> Path:
    return synthetic_mirror[0]


@pytest.fixture
def small_params() -> Params:
    return parse_params(TINY_PARAMS)


@pytest.fixture
def processed_dir(tmp_path: Path, raw_dir: Path, small_params: Params) -> Path:
    from stages.preprocess import preprocess

    out = tmp_path / "processed"
    preprocess.fn(small_params, raw_dir=raw_dir, processed_dir=out)
    return out


@pytest.fixture
def trained(tmp_path: Path, processed_dir: Path, small_params: Params) -> dict[str, Path]:
    from stages.train import train

    paths = {
        "processed_dir": processed_dir,
        "weights_path": tmp_path / "models" / "train" / "model_weights.pth",
        "live_dir": tmp_path / "reports" / "train",
    }
    train.fn(small_params, **paths)
    return paths


@pytest.fixture(scope="session")
def real_mirror(pytestconfig: pytest.Config) -> Path:
    """A folder with the four official files: FMNIST_MIRROR, the shared copy, or the download
    cache (tests/helpers/mirror.py). Looked for once a session; a skip is remembered as well."""
    found = find_real_mirror()
    pytestconfig.stash[REAL_MIRROR] = found
    if found.folder is None:
        pytest.skip(found.note)
    return found.folder


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make server` on a free port (never 4200) with its own PREFECT_HOME; yields the API URL."""
    with running_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, real_mirror: Path) -> tuple[Path, str]:
    """A repo copy with small params after one full `dvc repro`."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    edit_params(repo, **SMALL)
    result = dvc(repo, "repro", FMNIST_MIRROR=str(real_mirror))
    return repo, result.stdout + result.stderr


@pytest.fixture
def pipeline_copy(pipeline: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the reproduced pipeline (DVC cache included) for tests that change it."""
    return clone_pipeline(pipeline[0], tmp_path / "repo")


# Worst first: a test's outcome is its worst phase's (a teardown error after a pass is an error).
SEVERITY = ["error", "failed", "skipped", "passed"]


def e2e_outcomes(stats: dict[str, list]) -> tuple[dict[str, str], Counter[str]]:
    """Each e2e test's outcome by node id, and how many were skipped for each reason."""
    outcome: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    for category, reports in stats.items():
        kind = {"xfailed": "passed", "xpassed": "passed"}.get(category, category)
        if kind not in SEVERITY:
            continue
        for report in reports:
            if not isinstance(report, pytest.TestReport) or "e2e" not in report.keywords:
                continue
            previous = outcome.get(report.nodeid, "passed")
            if report.nodeid not in outcome or SEVERITY.index(kind) < SEVERITY.index(previous):
                outcome[report.nodeid] = kind
            if kind == "skipped" and isinstance(report.longrepr, tuple):
                reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    return outcome, reasons


def e2e_summary(stats: dict[str, list], found: RealMirror | None) -> list[tuple[str, str]]:
    """The summary lines (text, color): how many e2e tests ran, by outcome, and why any skipped."""
    outcome, reasons = e2e_outcomes(stats)
    counts = Counter(outcome.values())
    ran = counts["passed"] + counts["failed"]
    line = f"e2e: {ran} ran ({counts['passed']} passed, {counts['failed']} failed)"
    line += f", {counts['skipped']} skipped"
    if counts["error"]:  # a fixture or teardown failed: counted apart from the tests that ran
        line += f", {counts['error']} errors"
    deselected = sum(1 for item in stats.get("deselected", []) if item.get_closest_marker("e2e"))
    if deselected:
        line += f", {deselected} deselected"
    color = "red" if counts["failed"] or counts["error"] else "yellow" if reasons else "green"
    lines = [(line, color)]
    lines += [(f"  {n} skipped: {reason}", "yellow") for reason, n in reasons.most_common()]
    if found is not None:  # the real_mirror fixture ran
        where = found.note if found.folder else "none"
        lines.append((f"  real data: {where} (looked for in {found.seconds:.1f} s)", color))
    return lines


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> Iterator[None]:
    """Ends the summary, after the short test summary, with how many e2e tests ran."""
    try:
        return (yield)
    finally:
        found = config.stash.get(REAL_MIRROR, None)
        for text, color in e2e_summary(terminalreporter.stats, found):
            terminalreporter.write_line(text, **{color: True})
