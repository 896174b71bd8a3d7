import copy
import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from safetensors.torch import load_file

import stages.export
from stages.artifacts import file_digest, load_torch
from stages.config import Params
from stages.errors import StageError
from stages.evaluate import evaluate
from stages.export import OnnxCheckError, export
from stages.fashion_mnist import load_split, save_split
from stages.model import ConvNet, NeuralNetwork, load_model
from stages.records import RecordError
from stages.train import train

from .helpers.data import perturb_weights, restamp_record
from .helpers.tools import REPO


def onnx_logits(path: Path, inputs: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": inputs.numpy()})[0]


def test_the_onnx_bytes_do_not_depend_on_where_the_checkout_is() -> None:
    onnx_file = stages.export.onnx_bytes(NeuralNetwork())
    assert str(Path(stages.export.__file__).parent).encode() not in onnx_file
    assert stages.export.STACK_TRACE_KEY.encode() not in onnx_file
    assert b"linear_relu_stack" in onnx_file  # the rest of the provenance stays


@pytest.mark.parametrize(
    ("measured", "recorded"), [(0.0, 1e-7), (2.38e-6, 1e-5), (1e-5, 1e-5), (1.01e-5, 1e-4)]
)
def test_the_card_records_the_decade_above_the_difference(measured: float, recorded: float) -> None:
    assert stages.export.decade_above(measured) == recorded


def test_export_writes_loadable_weights_and_a_card(
    tmp_path: Path, raw_dir: Path, trained: dict[str, Path], small_params: Params
) -> None:
    eval_dir = tmp_path / "reports" / "evaluate"
    evaluate.fn(small_params, **trained, out_dir=eval_dir)
    out = tmp_path / "models"
    export.fn(small_params, trained["weights_path"], eval_dir, out, trained["processed_dir"])

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
    export.fn(params, weights, eval_dir, out, processed_dir)

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
    # Convolutions and BatchNorm go through the exporter too, and pass the same check.
    assert card["onnx"]["check"]["argmax_agreement"] == 1.0
    assert onnx_logits(out / "model.onnx", torch.zeros(3, 1, 28, 28)).shape == (3, 10)
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
    args = (trained["weights_path"], eval_dir, out, trained["processed_dir"])
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
        export.fn(
            edited,
            trained["weights_path"],
            evaluated,
            tmp_path / "models",
            trained["processed_dir"],
        )
    card = json.loads((tmp_path / "models" / "model_card.json").read_text())
    assert card["params"]["train"] == small_params.train.model_dump(mode="json")
    assert "differs from the one" in caplog.text


def test_weights_changed_after_training_are_refused(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    perturb_weights(trained["weights_path"])
    with pytest.raises(RecordError, match=r"model_weights\.pth: sha256 .* the train stage wrote"):
        export.fn(
            small_params,
            trained["weights_path"],
            evaluated,
            tmp_path / "models",
            trained["processed_dir"],
        )
    assert not (tmp_path / "models" / "model_card.json").exists()


def test_metrics_of_other_weights_are_refused(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    retrained = small_params.model_copy(update={"seed": small_params.seed + 1})
    train.fn(retrained, **trained)  # new weights and record; evaluate has not seen them
    with pytest.raises(RecordError, match=r"metrics\.json: scores other weights"):
        export.fn(
            small_params,
            trained["weights_path"],
            evaluated,
            tmp_path / "models",
            trained["processed_dir"],
        )


def export_to(out: Path, trained: dict[str, Path], evaluated: Path, params: Params) -> dict:
    return export.fn(params, trained["weights_path"], evaluated, out, trained["processed_dir"])


def test_the_onnx_file_runs_at_any_batch_size_and_matches_pytorch(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    out = tmp_path / "models"
    export_to(out, trained, evaluated, small_params)

    proto = onnx.load(out / "model.onnx")
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # named, not fixed: the dynamic batch
    model = load_model(out / "model_weights.pth", small_params.train).eval()
    for size in (1, 7, 64):
        inputs = torch.randn(size, 1, 28, 28, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = model(inputs).numpy()
        assert np.abs(onnx_logits(out / "model.onnx", inputs) - expected).max() <= 1e-4


def test_the_card_records_the_onnx_file_and_its_check(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    out = tmp_path / "models"
    export_to(out, trained, evaluated, small_params)
    card = json.loads((out / "model_card.json").read_text())
    onnx_card, check = card["onnx"], card["onnx"]["check"]
    assert card["files"]["model.onnx"] == file_digest(out / "model.onnx", "sha256")
    assert (onnx_card["file"], onnx_card["opset"], onnx_card["dynamic_batch"]) == (
        "model.onnx",
        18,
        True,
    )
    _, labels = load_split(trained["processed_dir"], "test")
    assert check["images"] == len(labels) == 40  # the whole synthetic test split
    assert 0 < check["max_abs_diff_at_most"] <= check["max_abs_diff_allowed"] == 1e-4
    assert check["argmax_agreement"] == 1.0 and check["argmax_agreement_required"] == 0.9999
    assert check["onnxruntime_version"] == onnxruntime.__version__
    text = " ".join((out / "model_card.md").read_text().split())  # as rendered: lines joined
    assert "| opset | 18 |" in text and card["files"]["model.onnx"] in text
    assert "onnxruntime " + onnxruntime.__version__ in text


def test_a_second_export_writes_the_same_onnx_bytes(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    """`dvc repro --force` must leave dvc.lock as it was: the ONNX export is deterministic."""
    first = export_to(tmp_path / "a", trained, evaluated, small_params)
    second = export_to(tmp_path / "b", trained, evaluated, small_params)
    assert first["files"] == second["files"]
    assert (tmp_path / "a" / "model_card.json").read_bytes() == (
        tmp_path / "b" / "model_card.json"
    ).read_bytes()


def skewed_onnx(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """The exporter writes a network whose last layer is scaled: a wrong file to catch."""
    real = stages.export.onnx_bytes

    def wrong(model: torch.nn.Module) -> bytes:
        skewed = copy.deepcopy(model)
        with torch.no_grad():
            last = skewed.linear_relu_stack[-1]
            last.weight.mul_(scale)
            last.bias.add_(torch.arange(10.0))  # shifts which class wins
        return real(skewed)

    monkeypatch.setattr(stages.export, "onnx_bytes", wrong)


def test_an_onnx_file_that_disagrees_with_pytorch_fails_naming_both_numbers(
    tmp_path: Path,
    trained: dict[str, Path],
    evaluated: Path,
    small_params: Params,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "export"
    export_to(out, trained, evaluated, small_params)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    skewed_onnx(monkeypatch, 1.5)
    with pytest.raises(OnnxCheckError) as caught:
        export_to(out, trained, evaluated, small_params)
    message = str(caught.value)
    assert re.search(
        rf"{re.escape(str(out))}/model\.onnx: onnxruntime \S+ disagrees with PyTorch on the 40 "
        r"test images: "
        r"max abs logit difference [0-9.e+-]+ \(allowed <= 0\.0001\), "
        r"argmax agreement [0-9.]+ % \(\d+ of 40; required >= 99\.99 %\); no out was replaced",
        message,
    ), message
    assert "\n" not in message  # the command line prints it as one `error:` line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_agreement_threshold_alone_fails_the_check(
    tmp_path: Path,
    trained: dict[str, Path],
    evaluated: Path,
    small_params: Params,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stages.export, "ONNX_MIN_AGREEMENT", 1.01)
    with pytest.raises(OnnxCheckError, match=r"argmax agreement 100\.00 % \(40 of 40; required"):
        export_to(tmp_path / "export", trained, evaluated, small_params)
    assert not (tmp_path / "export" / "model.onnx").exists()
    assert not list((tmp_path / "export").glob(".model*.tmp"))  # no temporary left behind


def test_a_nan_logit_fails_the_check_rather_than_passing_it() -> None:
    expected = np.zeros((4, 10), dtype=np.float32)
    got = expected.copy()
    got[2, 3] = np.nan
    with pytest.raises(OnnxCheckError, match=r"max abs logit difference nan \(allowed"):
        stages.export.compare_logits(expected, got, Path("models/model.onnx"))


def test_a_test_split_other_than_the_one_evaluate_scored_is_refused(
    tmp_path: Path, trained: dict[str, Path], evaluated: Path, small_params: Params
) -> None:
    images, labels = load_split(trained["processed_dir"], "test")
    save_split(255 - images, labels, trained["processed_dir"], "test")
    with pytest.raises(RecordError, match=r"test\.pt: sha256 .* is not the test split evaluate"):
        export_to(tmp_path / "models", trained, evaluated, small_params)


def test_dvc_yaml_lists_the_onnx_file_and_the_test_split_it_is_checked_on() -> None:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["export"]
    assert "models/model.onnx" in stage["outs"]
    assert "data/processed" in stage["deps"]
