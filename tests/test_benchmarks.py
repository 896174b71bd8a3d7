import ast
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


def test_time_to_accuracy_reads_the_stages_epoch_lines_and_summarises_the_seeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    tta = load_benchmark("time_to_accuracy")
    monkeypatch.chdir(ROOT)
    fast = tta.with_overrides(tta.FAST_PROFILE)  # the documented profile is valid params
    assert fast.train.precision == "bf16"
    clock = tta.EpochClock()
    logger = logging.getLogger("test.epochs")
    logger.setLevel(logging.INFO)
    logger.addHandler(clock)
    logger.info("epoch %d/%d: %s", 1, 2, "val/accuracy 0.8")  # stages.train's own format
    logger.info("wrote %s", "w.pth")
    assert list(clock.at) == [1]
    runs = [
        {"train_s": 10.0, "accuracy": 0.9051, "time_to_90_s": 6.0},
        {"train_s": 12.0, "accuracy": 0.9049, "time_to_90_s": 8.0},
        {"train_s": 11.0, "accuracy": 0.9062, "time_to_90_s": 7.0},
    ]
    figures = tta.summary(runs, fast, train_size=54_000)
    assert figures == {
        "train_s": 11.0,
        "accuracies": [0.9051, 0.9049, 0.9062],
        "mean": 0.9054,
        "time_to_90_s": 7.0,
        "sps": round(fast.train.epochs * 54_000 / 11.0),
    }
    runs[1]["time_to_90_s"] = None  # a seed that never got there: no time for the kind
    assert tta.summary(runs, fast, train_size=54_000)["time_to_90_s"] is None


TRAINING_BENCHMARKS = ["accuracy", "time_to_accuracy", "compile_speed", "ddp_speed"]
LOADS_TORCH = ("torch", "torchvision", "accuracy", "train_speed")  # the last two: sibling scripts


@pytest.mark.parametrize("name", TRAINING_BENCHMARKS)
def test_a_benchmark_that_trains_imports_stages_before_torch(name: str) -> None:
    """Importing `stages` pins the portable numerics the stage trains with (stages/numerics.py),
    but only before torch loads: a benchmark that imported torch first would time and score
    other numerics. Import sorting moved `import torch` first in two of them once."""
    tree = ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())
    pinned = False
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        roots = {module.split(".")[0] for module in modules}
        assert pinned or not roots & set(LOADS_TORCH), f"{name}.py loads torch before `stages`"
        pinned = pinned or "stages" in roots
    assert pinned
