"""Stage records: what a stage used and what it made, written as an out beside its other outs.

preprocess writes data/processed/record.json, train models/train/record.json (with
preprocess's record inside), evaluate reports/evaluate/record.json. A record holds the params
sections the stage was given, the sha256 of each file it read and of each out it wrote (by file
name), and, for train, the code and the device. A later stage checks the files it loads against
the record of the stage that made them, and the model card is built from the records, not from
params.yaml as it is now: no record claims a value that did not produce the outs beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stages.artifacts import file_digest
from stages.config import TrainParams
from stages.errors import StageError

RECORD_FILE = "record.json"


class RecordError(StageError):
    """A record is missing or unreadable, or a file does not match what its record says."""


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of each file, by file name."""
    return {Path(path).name: file_digest(path, "sha256") for path in paths}


def make_record(
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    outputs: dict[str, str],
    **extra: Any,
) -> dict[str, Any]:
    return {"stage": stage, "params": params, "inputs": inputs, "outputs": outputs, **extra}


def read_record(path: Path, stage: str) -> dict[str, Any]:
    """The record `stage` wrote at `path`, checked for its shape."""
    rerun = f"rerun the {stage} stage (dvc repro --force -s {stage})"
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: missing; {rerun}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc}); {rerun}") from None
    shaped = (
        isinstance(record, dict)
        and record.get("stage") == stage
        and all(isinstance(record.get(key), dict) for key in ("params", "inputs", "outputs"))
    )
    if not shaped:
        raise RecordError(
            f"{path}: not a record of the {stage} stage (expected an object with stage, "
            f"params, inputs and outputs); {rerun}"
        )
    return record


def require_output(record: dict[str, Any], record_path: Path, path: Path) -> str:
    """Fails unless `path` is the file the record says its stage wrote; returns its sha256."""
    stage = record["stage"]
    expected = record["outputs"].get(Path(path).name)
    try:
        actual = file_digest(path, "sha256")
    except FileNotFoundError:
        raise RecordError(f"{path}: missing; run the {stage} stage first") from None
    if actual != expected:
        raise RecordError(
            f"{path}: sha256 {actual[:12]}… is not what {record_path} says the {stage} stage "
            f"wrote ({str(expected)[:12]}…): the file was changed or replaced after that run. "
            f"`python -m stages.verify` checks every out; rerun the stage with "
            f"dvc repro --force -s {stage}"
        )
    return actual


def recorded_outputs(record_path: Path, stage: str, *paths: Path) -> dict[str, str]:
    """sha256 of each file, by name, each checked against `stage`'s record at `record_path`."""
    record = read_record(record_path, stage)
    return {Path(path).name: require_output(record, record_path, path) for path in paths}


def trained_with(record: dict[str, Any], record_path: Path) -> TrainParams:
    """The train params the weights beside `record_path` were made with."""
    try:
        return TrainParams.model_validate(record["params"]["train"])
    except (KeyError, ValidationError) as exc:
        raise RecordError(
            f"{record_path}: params.train is not a valid train section ({exc}); "
            "rerun the train stage (dvc repro --force -s train)"
        ) from None
