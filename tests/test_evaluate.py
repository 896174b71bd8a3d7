import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages.config import Params
from stages.errors import StageError
from stages.evaluate import (
    confusion_matrix,
    evaluate,
    per_class_table,
    read_training_curves,
    training_curves_figure,
)

from .helpers.data import perturb_weights


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


def test_weights_of_another_shape_are_refused(
    tmp_path: Path, trained: dict[str, Path], small_params: Params
) -> None:
    other = small_params.model_copy(
        update={"train": small_params.train.model_copy(update={"hidden_sizes": [64]})}
    )
    with pytest.raises(StageError, match=r"does not fit NeuralNetwork\(hidden_sizes=\[64\]\)"):
        evaluate.fn(other, **trained, out_dir=tmp_path / "out")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_missing_input_found_late_changes_no_out(
    evaluated: Path, trained: dict[str, Path], small_params: Params
) -> None:
    before = snapshot(evaluated)
    perturb_weights(trained["weights_path"])
    (trained["live_dir"] / "plots" / "metrics" / "val" / "loss.tsv").unlink()
    with pytest.raises(StageError, match=r"val/loss\.tsv: missing; run the train stage first"):
        evaluate.fn(small_params, **trained, out_dir=evaluated)
    assert snapshot(evaluated) == before
