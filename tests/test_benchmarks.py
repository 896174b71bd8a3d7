import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_overrides_are_applied_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    accuracy = load_benchmark("accuracy")
    monkeypatch.chdir(ROOT)
    settings = ["train.model=cnn", "train.conv_channels=[8, 16]", "device=mps"]
    params = accuracy.with_overrides(settings)
    assert (params.train.model, params.train.conv_channels) == ("cnn", [8, 16])
    assert params.device == "mps"
    assert params.train.epochs == accuracy.with_overrides([]).train.epochs
    with pytest.raises(SystemExit, match="train.model = 'rnn': Input should be 'mlp' or 'cnn'"):
        accuracy.with_overrides(["train.model=rnn"])
    with pytest.raises(SystemExit, match="seed=3: the seeds come from --seeds"):
        accuracy.with_overrides(["seed=3"])
    with pytest.raises(SystemExit, match="expected section.key=value"):
        accuracy.with_overrides(["train.model"])
