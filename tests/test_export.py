import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.artifacts import load_torch
from stages.config import Params
from stages.errors import StageError
from stages.evaluate import evaluate
from stages.export import export
from stages.model import ConvNet, NeuralNetwork, load_model
from stages.records import RecordError
from stages.train import train

from .helpers.data import perturb_weights, restamp_record


def test_export_writes_loadable_weights_and_a_card(
    tmp_path: Path, raw_dir: Path, trained: dict[str, Path], small_params: Params
) -> None:
    eval_dir = tmp_path / "reports" / "evaluate"
    evaluate.fn(small_params, **trained, out_dir=eval_dir)
    out = tmp_path / "models"
    export.fn(small_params, trained["weights_path"], eval_dir, out)

    model = NeuralNetwork()
    state = torch.load(out / "model_weights.pth", weights_only=True)
    model.load_state_dict(state, strict=True)
    tensors = load_file(out / "model.safetensors")
    assert all(torch.equal(tensors[k], state[k]) for k in state)

    card = json.loads((out / "model_card.json").read_text())
    assert card["metrics"] == json.loads((eval_dir / "metrics.json").read_text())
    assert card["params"]["train"]["epochs"] == 2 and "download" not in card["params"]
    assert set(card["data"]) == {p.name for p in raw_dir.iterdir()}
    assert len(card["code"]["stages_sha256"]) == 64
    assert card["input"]["normalize"]["std"] > 0
    assert "strict=True" in (out / "model_card.md").read_text()


def test_a_cnn_trains_evaluates_and_exports_with_a_card_that_rebuilds_it(
    tmp_path: Path, raw_dir: Path, processed_dir: Path, small_params: Params
) -> None:
    cnn = small_params.train.model_copy(
        update={"model": "cnn", "conv_channels": [4, 8], "hidden_sizes": [16], "epochs": 1}
    )
    params = small_params.model_copy(update={"train": cnn})
    weights = tmp_path / "w.pth"
    train.fn(params, processed_dir, weights, tmp_path / "live")
    eval_dir = tmp_path / "eval"
    metrics = evaluate.fn(params, processed_dir, weights, tmp_path / "live", eval_dir)
    out = tmp_path / "models"
    export.fn(params, weights, eval_dir, out)

    card = json.loads((out / "model_card.json").read_text())
    assert card["constructor"] == "ConvNet(conv_channels=[4, 8], hidden_sizes=[16])"
    assert card["architecture"].startswith("ConvNet: 3x3 Conv-BatchNorm-ReLU-MaxPool blocks of 4")
    assert load_file(out / "model.safetensors").keys() == load_torch(weights).keys()
    snippet = (out / "model_card.md").read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(snippet.replace("models/model_weights.pth", str(out / "model_weights.pth")), scope)
    assert isinstance(scope["model"], ConvNet)
    assert scope["model"](torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert card["metrics"]["accuracy"] == metrics["accuracy"]
    with pytest.raises(StageError, match=r"does not fit NeuralNetwork\(hidden_sizes=\[16\]\)"):
        load_model(weights, cnn.model_copy(update={"model": "mlp"}))


@pytest.mark.parametrize(
    ("metrics", "error"),
    [
        ('{"accuracy": 0.9', r"metrics\.json: not valid JSON"),
        ('{"accuracy": 0.9}', r"metrics\.json: expected an object with the finite numbers acc"),
        ('{"accuracy": "x", "loss": 1, "macro_f1": 1}', r"metrics\.json: expected an object"),
        # Python's json reads NaN and Infinity; the model card must not repeat them.
        ('{"accuracy": NaN, "loss": 1, "macro_f1": 1}', r"metrics\.json: expected an object"),
        ('{"accuracy": 0.9, "loss": -Infinity, "macro_f1": 1}', r"metrics\.json: expected an"),
    ],
)
def test_bad_metrics_stop_export_before_any_out_changes(
    tmp_path: Path,
    raw_dir: Path,
    trained: dict[str, Path],
    small_params: Params,
    metrics: str,
    error: str,
) -> None:
    eval_dir = tmp_path / "reports" / "evaluate"
    evaluate.fn(small_params, **trained, out_dir=eval_dir)
    out = tmp_path / "export"
    args = (trained["weights_path"], eval_dir, out)
    export.fn(small_params, *args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (eval_dir / "metrics.json").write_text(metrics)
    restamp_record(eval_dir)  # as if evaluate had written these metrics
    with pytest.raises(StageError, match=error):
        export.fn(small_params, *args)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture
def evaluated(tmp_path: Path, trained: dict[str, Path], small_params: Params) -> Path:
    eval_dir = tmp_path / "reports" / "evaluate"
    evaluate.fn(small_params, **trained, out_dir=eval_dir)
    return eval_dir


def test_the_card_describes_the_trained_weights_not_params_edited_since(
    tmp_path: Path,
    trained: dict[str, Path],
    evaluated: Path,
    small_params: Params,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's case: change the train params, then `dvc repro -s export`."""
    edited = small_params.model_copy(
        update={"train": small_params.train.model_copy(update={"learning_rate": 0.5})}
    )
    with caplog.at_level(logging.WARNING, logger="stages.export"):
        export.fn(edited, trained["weights_path"], evaluated, tmp_path / "models")
    card = json.loads((tmp_path / "models" / "model_card.json").read_text())
    assert card["params"]["train"] == small_params.train.model_dump(mode="json")
    assert "differs from the one" in caplog.text


def test_weights_changed_after_training_are_refused(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    perturb_weights(trained["weights_path"])
    with pytest.raises(RecordError, match=r"model_weights\.pth: sha256 .* the train stage wrote"):
        export.fn(small_params, trained["weights_path"], evaluated, tmp_path / "models")
    assert not (tmp_path / "models" / "model_card.json").exists()


def test_metrics_of_other_weights_are_refused(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    retrained = small_params.model_copy(update={"seed": small_params.seed + 1})
    train.fn(retrained, **trained)  # new weights and record; evaluate has not seen them
    with pytest.raises(RecordError, match=r"metrics\.json: scores other weights"):
        export.fn(small_params, trained["weights_path"], evaluated, tmp_path / "models")
