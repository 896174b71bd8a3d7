import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages.config import Params
from stages.errors import StageError
from stages.evaluate import (
    CURVES,
    CurvesFormatError,
    confusion_matrix,
    evaluate,
    per_class_table,
    read_training_curves,
    training_curves_figure,
)
from stages.records import RecordError

from .helpers.data import perturb_weights, restamp_record


@pytest.fixture
def evaluated(tmp_path: Path, trained: dict[str, Path], small_params: Params) -> Path:
    out = tmp_path / "reports" / "evaluate"
    evaluate.fn(small_params, **trained, out_dir=out)
    return out


def test_metrics_have_top_level_accuracy_and_loss(evaluated: Path) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "loss", "macro_f1"}
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


def test_per_class_table_and_plots(evaluated: Path) -> None:
    table = pd.read_csv(evaluated / "per_class.csv")
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert len(table) == 10 and table["support"].sum() == 40
    pairs = pd.read_csv(evaluated / "confusion.csv")
    assert list(pairs.columns) == ["actual", "predicted"] and len(pairs) == 40
    for png in ("confusion_matrix.png", "training_curves.png"):
        assert (evaluated / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_compare_like_with_like_by_epoch_from_1(trained: dict[str, Path]) -> None:
    figure = training_curves_figure(read_training_curves(trained["live_dir"]), 0.1)
    objective, plain, accuracy = figure.axes
    assert "label smoothing 0.1" in objective.get_title()
    legends = [text.get_text() for text in objective.get_legend().get_texts()]
    assert legends[0].startswith("train loss") and legends[1].startswith("val loss (same objective")
    assert "plain cross-entropy" in plain.get_title() and "accuracy" in accuracy.get_title()
    for ax in figure.axes:
        assert ax.get_xlabel() == "epoch"
        for line in ax.get_lines():
            assert list(line.get_xdata()) == [1, 2]


def test_per_class_scores_from_a_known_confusion_matrix() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    counts = confusion_matrix(labels, predictions)
    assert counts[0, 1] == 1 and counts.sum() == 6
    table = per_class_table(counts)
    assert table.loc[1, "precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert table.loc[0, "recall"] == pytest.approx(0.5)
    assert table.loc[2, "f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert table.loc[5, "support"] == 0


def test_the_network_shape_comes_from_the_train_record_not_params(
    tmp_path: Path, trained: dict[str, Path], small_params: Params
) -> None:
    edited = small_params.model_copy(
        update={"train": small_params.train.model_copy(update={"hidden_sizes": [64]})}
    )
    evaluate.fn(edited, **trained, out_dir=tmp_path / "out")  # params.yaml edited since train
    record_path = trained["weights_path"].with_name("record.json")
    record = json.loads(record_path.read_text())
    record["params"]["train"]["hidden_sizes"] = [64]
    record_path.write_text(json.dumps(record))
    with pytest.raises(StageError, match=r"does not fit NeuralNetwork\(hidden_sizes=\[64\]\)"):
        evaluate.fn(small_params, **trained, out_dir=tmp_path / "out")


def test_weights_changed_after_training_are_refused(
    evaluated: Path, trained: dict[str, Path], small_params: Params
) -> None:
    before = snapshot(evaluated)
    perturb_weights(trained["weights_path"])
    with pytest.raises(RecordError, match=r"model_weights\.pth: sha256 .* the train stage wrote"):
        evaluate.fn(small_params, **trained, out_dir=evaluated)
    assert snapshot(evaluated) == before


def test_the_evaluate_record_names_the_weights_it_scored(
    evaluated: Path, trained: dict[str, Path]
) -> None:
    record = json.loads((evaluated / "record.json").read_text())
    weights = hashlib.sha256(trained["weights_path"].read_bytes()).hexdigest()
    assert record["inputs"]["model_weights.pth"] == weights
    metrics = hashlib.sha256((evaluated / "metrics.json").read_bytes()).hexdigest()
    assert record["outputs"]["metrics.json"] == metrics


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_missing_input_found_late_changes_no_out(
    evaluated: Path, trained: dict[str, Path], small_params: Params
) -> None:
    before = snapshot(evaluated)
    perturb_weights(trained["weights_path"])
    restamp_record(trained["weights_path"].parent)  # as if train had written these weights
    (trained["live_dir"] / "plots" / "metrics" / "val" / "loss.tsv").unlink()
    with pytest.raises(StageError, match=r"val/loss\.tsv: missing; run the train stage first"):
        evaluate.fn(small_params, **trained, out_dir=evaluated)
    assert snapshot(evaluated) == before


def write_curves(live_dir: Path) -> None:
    """The four curve files as dvclive writes them, two epochs each."""
    for name in CURVES:
        path = live_dir / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        column = name.split("/")[-1]
        path.write_text(f"timestamp\tstep\t{column}\n1700000000\t1\t0.5\n1700000001\t2\t0.4\n")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage \x00\x81", "not a tab-separated table"),
        (b"", "not a tab-separated table"),
        (b'{"loss": [0.5, 0.4]}\n', r"no 'step' or 'loss' column"),
        (b"timestamp\tstep\tvalue\n1\t1\t0.5\n", r"no 'loss' column"),
        (b"timestamp\tstep\tloss\n", "no rows"),
        (b"timestamp\tstep\tloss\n1\t1\t0.5\n2\t2\tlots\n", r"a 'loss' value that is not a finite"),
        (b"timestamp\tstep\tloss\n1\tone\t0.5\n", r"a 'step' value that is not a finite"),
        (b"timestamp\tstep\tloss\n1\t1\tnan\n", r"a 'loss' value that is not a finite"),
    ],
)
def test_a_garbage_curve_file_is_named_with_what_to_rerun(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    write_curves(tmp_path)
    path = tmp_path / "plots" / "metrics" / "val" / "loss.tsv"
    path.write_bytes(content)
    expected = rf"{re.escape(str(path))}: {problem}.*; rerun the train stage$"
    with pytest.raises(CurvesFormatError, match=expected):
        read_training_curves(tmp_path)


def test_good_curve_files_are_read_as_numbers(tmp_path: Path) -> None:
    write_curves(tmp_path)
    curves = read_training_curves(tmp_path)
    assert list(curves["val/accuracy"]["step"]) == [1, 2]
    assert list(curves["val/accuracy"]["accuracy"]) == [0.5, 0.4]


def test_a_garbage_curve_file_stops_evaluate_before_any_out_changes(
    evaluated: Path, trained: dict[str, Path], small_params: Params
) -> None:
    before = snapshot(evaluated)
    path = trained["live_dir"] / "plots" / "metrics" / "train" / "loss.tsv"
    path.write_text("<html>not a curve</html>\n")
    with pytest.raises(StageError, match=rf"{re.escape(str(path))}: .*rerun the train stage"):
        evaluate.fn(small_params, **trained, out_dir=evaluated)
    assert snapshot(evaluated) == before
