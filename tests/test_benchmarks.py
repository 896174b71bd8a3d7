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


def test_predict_speed_measures_both_runtimes_in_turns_and_names_the_cpu() -> None:
    predict_speed = load_benchmark("predict_speed")
    calls: list[tuple[str, int]] = []

    def runtime(name: str):
        def logits(batch):
            calls.append((name, len(batch)))
            return batch.reshape(len(batch), -1)[:, :10]

        return logits

    figures = predict_speed.measure(
        {"torch": runtime("torch"), "onnxruntime": runtime("onnxruntime")},
        runs=5,
        rounds=2,
        batch_size=8,
        batches=2,
    )
    for name in ("torch", "onnxruntime"):
        assert set(figures[name]) == {"latency_ms_p50", "latency_ms_p99", "throughput_ips_batch_8"}
        assert 0 < figures[name]["latency_ms_p50"] <= figures[name]["latency_ms_p99"]
    # Turns: each round runs torch, then onnxruntime, so neither gets all the quiet spells.
    order = [name for i, (name, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != name]
    assert order == ["torch", "onnxruntime"] * 2
    assert set(predict_speed.speedup(figures)) == set(figures["torch"])
    assert predict_speed.cpu_name().strip()
