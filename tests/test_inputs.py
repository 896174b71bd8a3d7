"""A stage's inputs are checked again before its outs are replaced (stages/inputs.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages import inputs
from stages.artifacts import file_digest, write_text
from stages.config import load_params
from stages.errors import StageError

from .helpers.repo import clone_pipeline, edit_params
from .helpers.runner import Runner
from .helpers.tools import REPO, dvc


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """dvc.yaml, params.yaml and the stage code, in the current folder as DVC runs a stage."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "stages", tmp_path / "stages")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_spec_is_read_from_dvc_yaml() -> None:
    train = inputs.read_spec("train", REPO / "dvc.yaml")
    assert train is not None
    assert train.param_keys == ("seed", "device", "train", "evaluate")
    assert Path("stages/train.py") in train.deps and Path("data/processed") in train.deps
    assert Path("models/train/model_weights.pth") in train.outs
    assert Path("reports/train/metrics.json") in train.outs
    validate = inputs.read_spec("validate", REPO / "dvc.yaml")
    assert validate is not None and validate.param_keys is None  # the whole params.yaml
    assert inputs.read_spec("no-such-stage", REPO / "dvc.yaml") is None


def test_a_params_edit_during_the_run_stops_the_out_and_names_the_key(project: Path) -> None:
    out = project / "models/train/model_weights.pth"
    out.parent.mkdir(parents=True)
    out.write_text("old weights")
    with inputs.watching_inputs("train", load_params(Path("params.yaml"))):
        edit_params(project, train={"epochs": 99})
        with pytest.raises(inputs.InputsChanged, match=r"train\.epochs \d+ -> 99"):
            write_text("new weights", out)
    assert out.read_text() == "old weights"
    assert [p.name for p in out.parent.iterdir()] == ["model_weights.pth"]  # no temporary left


def test_a_code_edit_during_the_run_names_the_file(project: Path) -> None:
    out = project / "reports/train/metrics.json"
    with inputs.watching_inputs("train", load_params(Path("params.yaml"))):
        with open(project / "stages/train.py", "a") as code:
            code.write("# edited\n")
        with pytest.raises(inputs.InputsChanged, match=r"stages/train\.py"):
            write_text("{}", out)
    assert not out.exists()


def test_an_invalid_params_file_mid_run_is_named(project: Path) -> None:
    with inputs.watching_inputs("train", load_params(Path("params.yaml"))):
        (project / "params.yaml").write_text("train: [\n")
        with pytest.raises(inputs.InputsChanged, match=r"params\.yaml \(now invalid"):
            write_text("x", project / "models/train/model_weights.pth")


def test_edits_the_stage_does_not_read_and_writes_that_are_not_outs_pass(project: Path) -> None:
    with inputs.watching_inputs("train", load_params(Path("params.yaml"))):
        edit_params(project, export={"model_name": "renamed"})  # export's key, not train's
        write_text("w", project / "models/train/model_weights.pth")
        edit_params(project, train={"epochs": 99})
        write_text("checkpoint", project / "models/checkpoints/train.pt")  # not an out
    assert (project / "models/checkpoints/train.pt").read_text() == "checkpoint"


def test_without_a_dvc_yaml_entry_nothing_is_watched(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    with inputs.watching_inputs("train", params, tmp_path / "params.yaml"):
        edit_params(tmp_path, train={"epochs": 99})
        write_text("w", tmp_path / "models/train/model_weights.pth")


DOORS = {
    "dvc repro": ["dvc", "repro", "train"],
    "flow": ["python", "-m", "flows.pipeline", "--target", "train"],
}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("door", DOORS)
def test_params_edited_while_train_runs_are_refused_through_either_door(
    door: str, pipeline: tuple[Path, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The issue's case: `train.epochs` 2 -> 3 during training. DVC would hash the new params
    after the stage ends and record them against weights from 2 epochs."""
    repo = clone_pipeline(pipeline[0], tmp_path / "repo")
    edit_params(repo, train={"epochs": 2})
    env = {"PREFECT_API_URL": request.getfixturevalue("prefect_server")} if door == "flow" else {}
    lock_before = (repo / "dvc.lock").read_bytes()
    weights_before = file_digest(repo / "models/train/model_weights.pth")
    runner = Runner(repo, command=DOORS[door], **env)
    assert runner.wait_for("epoch 1/2"), runner.output
    edit_params(repo, train={"epochs": 3})
    assert runner.finish() != 0, runner.output
    errors = [line for line in runner.output.splitlines() if line.startswith("error:")]
    assert any("changed while the stage ran: train.epochs 2 -> 3" in e for e in errors), errors
    if door == "dvc repro":  # the flow's log also holds Prefect's report of the failed task run
        assert "Traceback" not in runner.output
    assert (repo / "dvc.lock").read_bytes() == lock_before
    assert file_digest(repo / "models/train/model_weights.pth") == weights_before
    assert "train" in dvc(repo, "status").stdout  # DVC sees the new params as not yet run


def test_an_out_folder_symlinked_out_of_the_project_is_refused_before_work(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The issue's case: `models/` a symlink out of the repo trained fully, then DVC refused."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (project / "models").symlink_to(elsewhere)
    with (
        pytest.raises(
            StageError,
            match=r"models/train/model_weights\.pth: resolves to .*"
            r"outside the project .*\(models is a symlink\)",
        ),
        inputs.watching_inputs("train", load_params(Path("params.yaml"))),
    ):
        pytest.fail("the stage ran")
