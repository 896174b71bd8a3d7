import hashlib
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import stages.checkpoint
import stages.model
import stages.train
from stages.artifacts import OutputError, load_torch
from stages.config import Params, TrainParams
from stages.dataset import load_dataset, make_loader, normalize_images, pixel_stats
from stages.errors import StageError
from stages.fashion_mnist import StatsError
from stages.model import (
    ModelTooLargeError,
    NeuralNetwork,
    build_model,
    fold_input_normalization,
    parameter_count,
)
from stages.records import RecordError
from stages.train import train

from .helpers.data import restamp_record
from .helpers.disk import tiny_disk
from .test_artifacts import _Payload


def test_the_seed_network_shape() -> None:
    model = NeuralNetwork()
    assert isinstance(model.flatten, torch.nn.Flatten)
    assert [tuple(p.shape) for p in model.parameters()] == [
        (512, 784),
        (512,),
        (512, 512),
        (512,),
        (10, 512),
        (10,),
    ]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_init_draws_he_weights_or_keeps_pytorchs(model: str) -> None:
    p = Params().train.model_copy(update={"model": model, "conv_channels": [64]})
    torch.manual_seed(0)
    he = build_model(p.model_copy(update={"init": "kaiming"}))
    torch.manual_seed(0)
    default = build_model(p.model_copy(update={"init": "torch"}))
    for layer_he, layer_default in zip(he.modules(), default.modules(), strict=True):
        if isinstance(layer_he, torch.nn.Linear | torch.nn.Conv2d):
            n, fan_in = layer_he.weight.numel(), layer_he.weight[0].numel()
            tolerance = 5 / (2 * n) ** 0.5  # five standard errors of a sample std
            assert layer_he.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=tolerance)
            assert layer_he.bias is None or not layer_he.bias.any()
            # PyTorch's default is uniform within +-1/sqrt(fan_in); He's normal goes beyond it.
            assert layer_default.weight.abs().max().item() <= fan_in**-0.5
            assert layer_he.weight.abs().max().item() > fan_in**-0.5


def test_weights_load_strictly_into_a_fresh_instance(trained: dict[str, Path]) -> None:
    state = torch.load(trained["weights_path"], weights_only=True)
    assert list(state)[:2] == ["linear_relu_stack.0.weight", "linear_relu_stack.0.bias"]
    NeuralNetwork().load_state_dict(state, strict=True)


def test_curves_are_logged_per_epoch_numbered_from_1(trained: dict[str, Path]) -> None:
    curves = trained["live_dir"] / "plots" / "metrics"
    for name in ("train/loss", "val/loss_train_objective", "val/loss", "val/accuracy"):
        frame = pd.read_csv(curves / f"{name}.tsv", sep="\t")
        assert list(frame["step"]) == [1, 2], name  # the epochs
    summary = json.loads((trained["live_dir"] / "metrics.json").read_text())
    assert set(summary["val"]) == {"loss_train_objective", "loss", "accuracy"}
    assert summary["step"] == 2  # the last epoch


def test_val_loss_under_the_training_objective_uses_its_label_smoothing(
    tmp_path: Path, processed_dir: Path, small_params: Params, trained: dict[str, Path]
) -> None:
    """The objective's val loss matches the train loss's; without smoothing it is the plain loss."""

    def last(live_dir: Path, name: str) -> float:
        return pd.read_csv(live_dir / "plots" / "metrics" / f"{name}.tsv", sep="\t").iloc[-1, 1]

    plain = trained["live_dir"]
    assert small_params.train.label_smoothing == 0
    assert last(plain, "val/loss_train_objective") == last(plain, "val/loss")
    smoothed = small_params.model_copy(
        update={"train": small_params.train.model_copy(update={"label_smoothing": 0.1})}
    )
    train.fn(smoothed, processed_dir, tmp_path / "w.pth", tmp_path / "live")
    # (1 - 0.1) * CE + 0.1 * (mean over classes of -log p) > CE, the mean being >= log 10 > CE.
    assert last(tmp_path / "live", "val/loss_train_objective") > last(tmp_path / "live", "val/loss")


def test_training_learns_the_synthetic_task(trained: dict[str, Path]) -> None:
    accuracy = float(
        (trained["live_dir"] / "plots/metrics/val/accuracy.tsv").read_text().split()[-1]
    )
    assert accuracy > 0.5  # chance is 0.1


def test_same_seed_same_weights(
    tmp_path: Path, processed_dir: Path, small_params: Params, trained: dict[str, Path]
) -> None:
    again = tmp_path / "again.pth"
    train.fn(small_params, processed_dir, again, tmp_path / "live2")
    first, second = load_torch(trained["weights_path"]), load_torch(again)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizers_and_hidden_sizes_come_from_params(
    tmp_path: Path, processed_dir: Path, small_params: Params, optimizer: str
) -> None:
    p = small_params.train.model_copy(
        update={"optimizer": optimizer, "hidden_sizes": [32], "epochs": 1}
    )
    out = tmp_path / "w.pth"
    train.fn(small_params.model_copy(update={"train": p}), processed_dir, out, tmp_path / "live")
    NeuralNetwork([32]).load_state_dict(load_torch(out), strict=True)


def test_batch_larger_than_the_split_is_refused(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    p = small_params.train.model_copy(update={"batch_size": 1000})
    with pytest.raises(StageError, match="train.batch_size = 1000: larger than the train split"):
        train.fn(
            small_params.model_copy(update={"train": p}),
            processed_dir,
            tmp_path / "w.pth",
            tmp_path / "live",
        )
    assert not (tmp_path / "w.pth").exists()


def with_train(params: Params, **changes: object) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})


def test_bf16_trains_under_autocast_into_fp32_weights_byte_for_byte_again(
    tmp_path: Path,
    processed_dir: Path,
    small_params: Params,
    trained: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = with_train(small_params, precision="bf16")
    runs = [tmp_path / "a", tmp_path / "b"]
    with caplog.at_level(logging.INFO, logger="stages.train"):
        for run in runs:
            train.fn(params, processed_dir, run / "w.pth", run / "live", run / "ck.pt")
    assert "bf16 autocast on cpu" in caplog.text or "without native bfloat16" in caplog.text
    weights = load_torch(runs[0] / "w.pth")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert (runs[0] / "w.pth").read_bytes() == (runs[1] / "w.pth").read_bytes()
    fp32 = load_torch(trained["weights_path"])
    assert not all(torch.equal(weights[k], fp32[k]) for k in fp32)  # autocast took effect
    record = json.loads((runs[0] / "record.json").read_text())
    assert record["params"]["train"]["precision"] == "bf16"
    accuracy = float((runs[0] / "live/plots/metrics/val/accuracy.tsv").read_text().split()[-1])
    assert accuracy > 0.5  # it learns as fp32 does (chance is 0.1)


def test_folding_per_pixel_normalization_gives_the_same_logits_on_stats_json_inputs() -> None:
    torch.manual_seed(0)
    model = NeuralNetwork([16])
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    mean, std = pixel_stats(images)
    served = (0.29, 0.35)
    folded = NeuralNetwork([16])
    folded.load_state_dict(fold_input_normalization(model.state_dict(), (mean, std), served))
    expected = model(normalize_images(images, mean, std))
    got = folded(normalize_images(images, *served))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(normalize_images(images, *served)), expected, atol=1e-2)


def test_per_pixel_scaling_is_refused_for_the_cnn() -> None:
    with pytest.raises(ValueError, match="input_scaling = 'per_pixel' needs model = 'mlp'"):
        TrainParams(model="cnn", input_scaling="per_pixel")


def test_per_pixel_scaling_saves_weights_that_score_on_stats_json_inputs_as_in_training(
    tmp_path: Path, processed_dir: Path, small_params: Params, trained: dict[str, Path]
) -> None:
    params = with_train(small_params, input_scaling="per_pixel")
    train.fn(params, processed_dir, tmp_path / "w.pth", tmp_path / "live", tmp_path / "ck.pt")
    model = stages.model.load_model(tmp_path / "w.pth", params.train)
    val = load_dataset(processed_dir, "val", torch.device("cpu"))  # stats.json's normalisation
    _, predictions = stages.model.test_loop(make_loader(val, 100, shuffle=False), model)
    last_epoch = float((tmp_path / "live/plots/metrics/val/accuracy.tsv").read_text().split()[-1])
    assert stages.model.accuracy(predictions, val.labels) == pytest.approx(last_epoch, abs=1e-6)
    fp32 = load_torch(trained["weights_path"])
    assert not torch.equal(
        load_torch(tmp_path / "w.pth")["linear_relu_stack.2.weight"],
        fp32["linear_relu_stack.2.weight"],
    )
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["params"]["train"]["input_scaling"] == "per_pixel"


def test_bf16_divergence_is_caught_as_in_fp32(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    params = with_train(small_params, optimizer="sgd", learning_rate=1e30, precision="bf16")
    with pytest.raises(StageError, match=r"training diverged: loss (nan|inf) at epoch 1, step"):
        train.fn(params, processed_dir, tmp_path / "w.pth", tmp_path / "live")
    assert not (tmp_path / "w.pth").exists()


def test_divergence_names_epoch_step_and_learning_rate(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    p = small_params.train.model_copy(update={"optimizer": "sgd", "learning_rate": 1e30})
    expected = r"loss nan at epoch 1, step 2 \(batch 2 of 6\), learning rate 1e\+30"
    with pytest.raises(StageError, match=expected):
        train.fn(
            small_params.model_copy(update={"train": p}),
            processed_dir,
            tmp_path / "w.pth",
            tmp_path / "live",
        )
    assert not (tmp_path / "w.pth").exists()


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_schedulers_and_augmentation_from_params(
    tmp_path: Path, processed_dir: Path, small_params: Params, scheduler: str
) -> None:
    p = small_params.train.model_copy(
        update={"scheduler": scheduler, "shift_pixels": 2, "hflip": True, "epochs": 2}
    )
    params = small_params.model_copy(update={"train": p})
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    train.fn(params, processed_dir, first, tmp_path / "live_a")
    train.fn(params, processed_dir, second, tmp_path / "live_b")
    assert first.read_bytes() == second.read_bytes()  # augmentation draws are seeded too


def test_another_seed_gives_other_weights(
    tmp_path: Path, processed_dir: Path, small_params: Params, trained: dict[str, Path]
) -> None:
    other = tmp_path / "other.pth"
    train.fn(small_params.model_copy(update={"seed": 7}), processed_dir, other, tmp_path / "l")
    assert other.read_bytes() != trained["weights_path"].read_bytes()


class Interrupted(Exception):
    """Stands in for a kill right after the n-th checkpoint reached the disk."""


def interrupt_after_checkpoint(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real_save = stages.train.save_checkpoint
    saved = []

    def save_then_stop(*args, **kwargs) -> None:
        real_save(*args, **kwargs)
        saved.append(1)
        if len(saved) == n:
            raise Interrupted

    monkeypatch.setattr(stages.train, "save_checkpoint", save_then_stop)


@pytest.fixture
def resumable(small_params: Params) -> Params:
    """3 epochs of 6 batches, a checkpoint every 4 batches, onecycle and augmentation: every
    piece of state a resume has to restore exactly."""
    p = small_params.train.model_copy(
        update={
            "epochs": 3,
            "checkpoint_every_steps": 4,
            "optimizer": "sgd",
            "scheduler": "onecycle",
            "learning_rate": 0.05,
            "shift_pixels": 2,
            "hflip": True,
        }
    )
    return small_params.model_copy(update={"train": p})


@pytest.mark.parametrize(
    "changes",
    [
        {"precision": "fp32"},
        {"precision": "bf16"},
        {"precision": "bf16", "input_scaling": "per_pixel"},  # as the fast profile trains
    ],
    ids=["fp32", "bf16", "bf16-per_pixel"],
)
@pytest.mark.parametrize("kill_after", [1, 2, 4, 6])  # mid-epoch 1, end of 1, mid 3, end of 3
def test_resume_after_interruption_is_byte_identical(
    tmp_path: Path,
    processed_dir: Path,
    resumable: Params,
    kill_after: int,
    changes: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    resumable = with_train(resumable, **changes)
    unbroken = tmp_path / "unbroken"
    train.fn(resumable, processed_dir, unbroken / "w.pth", unbroken / "live", unbroken / "ck.pt")
    assert not (unbroken / "ck.pt").exists()  # deleted once the weights are written

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, kill_after)
        with pytest.raises(Interrupted):
            train.fn(
                resumable, processed_dir, resumed / "w.pth", resumed / "live", resumed / "ck.pt"
            )
    assert not (resumed / "w.pth").exists() and not (resumed / "live").exists()
    with caplog.at_level(logging.INFO, logger="stages.train"):
        train.fn(resumable, processed_dir, resumed / "w.pth", resumed / "live", resumed / "ck.pt")
    assert "resuming from" in caplog.text
    assert (resumed / "w.pth").read_bytes() == (unbroken / "w.pth").read_bytes()
    for curve in sorted((unbroken / "live").rglob("*.*")):
        assert (
            curve.read_bytes()
            == (resumed / "live" / curve.relative_to(unbroken / "live")).read_bytes()
        )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("params", "it belongs to other params"),
        ("data", "it belongs to other data"),
        ("code", "it belongs to other code"),
        ("threads", "it belongs to other params"),
        ("malicious", "it cannot be loaded safely"),
        ("truncated-format", "not a format-1"),
    ],
)
def test_a_foreign_or_unsafe_checkpoint_is_ignored_saying_why(
    tmp_path: Path,
    processed_dir: Path,
    resumable: Params,
    change: str,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = tmp_path / "ck.pt"
    marker = tmp_path / "pwned"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, 2)
        with pytest.raises(Interrupted):
            train.fn(resumable, processed_dir, tmp_path / "w.pth", tmp_path / "l", checkpoint)
    params = resumable
    if change == "params":
        params = resumable.model_copy(update={"seed": 7})
    elif change == "data":
        stats = processed_dir / "stats.json"
        stats.write_text(stats.read_text().replace('"mean": 0.', '"mean": 0.0'))
        restamp_record(processed_dir)  # as if preprocess had written other data
    elif change == "code":
        monkeypatch.setattr(stages.checkpoint, "source_digest", lambda: "edited stage code")
    elif change == "threads":
        params = resumable.model_copy(
            update={"train": resumable.train.model_copy(update={"num_threads": 2})}
        )
    elif change == "truncated-format":
        torch.save({"format": 1, "model": {}}, checkpoint)
    else:
        torch.save({"format": 1, "model": _Payload(marker)}, checkpoint)
    with caplog.at_level(logging.INFO, logger="stages.train"):
        train.fn(params, processed_dir, tmp_path / "w.pth", tmp_path / "l", checkpoint)
    assert f"ignoring checkpoint {checkpoint}: {reason}" in caplog.text
    assert "resuming from" not in caplog.text
    assert not marker.exists()
    assert not checkpoint.exists()


def test_checkpoint_frequency_does_not_change_the_weights(
    tmp_path: Path, processed_dir: Path, resumable: Params, trained: dict[str, Path]
) -> None:
    every_step = resumable.train.model_copy(update={"checkpoint_every_steps": 1})
    train.fn(resumable, processed_dir, tmp_path / "a.pth", tmp_path / "la", tmp_path / "ca.pt")
    train.fn(
        resumable.model_copy(update={"train": every_step}),
        processed_dir,
        tmp_path / "b.pth",
        tmp_path / "lb",
        tmp_path / "cb.pt",
    )
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_deterministic_cuda_training_is_byte_identical(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    p = small_params.train.model_copy(update={"deterministic": True})
    params = small_params.model_copy(update={"device": "cuda", "train": p})
    try:
        for name in ("a", "b"):
            train.fn(
                params,
                processed_dir,
                tmp_path / f"{name}.pth",
                tmp_path / f"l{name}",
                tmp_path / f"c{name}.pt",
            )
    finally:
        torch.use_deterministic_algorithms(False)
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()


@pytest.mark.parametrize("momentum, low", [(0.9, 0.8), (0.95, 0.85), (0.05, 0.0), (0.0, 0.0)])
def test_onecycle_cycles_sgd_momentum_from_the_param(momentum: float, low: float) -> None:
    p = Params().train.model_copy(
        update={"optimizer": "sgd", "scheduler": "onecycle", "momentum": momentum, "epochs": 1}
    )
    model = NeuralNetwork([4])
    optimizer = stages.train.make_optimizer(model, p)
    scheduler = stages.train.make_scheduler(optimizer, p, steps_per_epoch=10)
    seen = [optimizer.param_groups[0]["momentum"]]
    for _ in range(9):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["momentum"])
    assert seen[0] == momentum and min(seen) == pytest.approx(low)


@pytest.mark.parametrize("out", ["weights", "checkpoint"])
def test_a_folder_at_the_checkpoint_or_weights_path_is_refused_before_training(
    tmp_path: Path,
    processed_dir: Path,
    small_params: Params,
    out: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = {"weights": tmp_path / "w.pth", "checkpoint": tmp_path / "checkpoints" / "train.pt"}
    paths[out].mkdir(parents=True)

    def no_training(*args, **kwargs) -> None:
        raise AssertionError("trained before refusing the folder")

    monkeypatch.setattr(stages.train, "train_loop", no_training)
    expected = rf"{re.escape(str(paths[out]))}: is a folder, expected a file \(or nothing\) there"
    with pytest.raises(StageError, match=expected):
        train.fn(
            small_params, processed_dir, paths["weights"], tmp_path / "live", paths["checkpoint"]
        )
    assert not (tmp_path / "live").exists()


@pytest.mark.parametrize(
    ("stats", "error"),
    [
        ('{"mean": 0.28, "std": 1e-45, "source": "train split"}', r"std = 1e-45: expected a"),
        ('{"mean": NaN, "std": 0.35, "source": "train split"}', "mean = nan: expected a number"),
        ('{"mean": 0.28, "std": Infinity, "source": "train split"}', "std = inf: expected a"),
        ('{"mean": 0.28, "std": -0.35, "source": "train split"}', r"std = -0.35: expected a"),
        ('{"mean": 0.28, "std": 0.0, "source": "params.yaml"}', r"std = 0.0: expected a"),
    ],
)
def test_unusable_normalisation_stats_are_named_before_training(
    tmp_path: Path,
    processed_dir: Path,
    small_params: Params,
    stats: str,
    error: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = processed_dir / "stats.json"
    path.write_text(stats)
    restamp_record(processed_dir)  # as if preprocess had written these stats
    monkeypatch.setattr(stages.train, "train_loop", lambda *a, **k: pytest.fail("it trained"))
    where = (
        "preprocess.mean and preprocess.std in params.yaml"
        if "params.yaml" in stats
        else "rerun the preprocess stage"
    )
    with pytest.raises(StatsError, match=rf"{re.escape(str(path))}: {error}.*{where}") as caught:
        train.fn(small_params, processed_dir, tmp_path / "w.pth", tmp_path / "live")
    assert "learning_rate" not in str(caught.value)
    assert not (tmp_path / "w.pth").exists()


@pytest.mark.parametrize(
    ("model", "hidden_sizes", "conv_channels"),
    [
        ("mlp", [512, 512], [32, 64]),
        ("mlp", [7], [32, 64]),
        ("mlp", [300, 100, 50], [32, 64]),
        ("cnn", [512, 512], [32, 64]),
        ("cnn", [16], [3]),
        ("cnn", [20, 10], [4, 8, 16]),
    ],
)
def test_parameter_count_is_computed_without_building(
    model: str, hidden_sizes: list[int], conv_channels: list[int]
) -> None:
    p = Params().train.model_copy(
        update={"model": model, "hidden_sizes": hidden_sizes, "conv_channels": conv_channels}
    )
    assert parameter_count(p) == sum(t.numel() for t in build_model(p).parameters())


def test_a_network_too_large_for_memory_is_refused_before_allocating(
    tmp_path: Path, processed_dir: Path, small_params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = small_params.train.model_copy(update={"hidden_sizes": [100_000_000]})
    with pytest.raises(
        ModelTooLargeError,
        match=r"^train\.hidden_sizes = \[100000000\]: a network of 79,500,000,010 parameters "
        r"needs about 1,184\.6 GiB \(weights, gradients, optimizer state\), and [\d,.]+ GiB of "
        "memory is available; expected smaller sizes$",
    ):
        build_model(huge)

    # Sizes that would fit a large machine are refused on a small one, naming every size key.
    free = type("Memory", (), {"available": 64 << 20})()
    monkeypatch.setattr(stages.model.psutil, "virtual_memory", lambda: free)
    cnn = small_params.train.model_copy(
        update={"model": "cnn", "conv_channels": [32], "hidden_sizes": [2048, 2048]}
    )
    expected = (
        r"train\.hidden_sizes = \[2048, 2048\], train\.conv_channels = \[32\]: a network of "
        r"17,064,298 parameters needs about 0\.3 GiB .* and 0\.1 GiB of memory is available"
    )
    with pytest.raises(ModelTooLargeError, match=expected):
        train.fn(
            small_params.model_copy(update={"train": cnn}),
            processed_dir,
            tmp_path / "w.pth",
            tmp_path / "live",
        )
    assert not (tmp_path / "w.pth").exists()


def test_processed_data_changed_after_preprocess_is_refused_naming_the_file(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    stats = processed_dir / "stats.json"
    stats.write_text(stats.read_text().replace('"mean": 0.', '"mean": 0.0'))
    with pytest.raises(RecordError, match=rf"{re.escape(str(stats))}: sha256 .* preprocess"):
        train.fn(small_params, processed_dir, tmp_path / "w.pth", tmp_path / "live")
    assert not (tmp_path / "w.pth").exists()


def test_the_record_beside_the_weights_says_what_made_them(
    trained: dict[str, Path], processed_dir: Path, small_params: Params
) -> None:
    record = json.loads(trained["weights_path"].with_name("record.json").read_text())
    weights_sha256 = hashlib.sha256(trained["weights_path"].read_bytes()).hexdigest()
    assert record["outputs"] == {trained["weights_path"].name: weights_sha256}
    assert record["params"]["train"] == small_params.train.model_dump(mode="json")
    assert record["params"]["seed"] == small_params.seed
    assert set(record["inputs"]) == {"train.pt", "val.pt", "stats.json"}
    assert record["preprocess"] == json.loads((processed_dir / "record.json").read_text())
    assert record["ran_on"]["device"] == "cpu"
    assert "portable" in record["ran_on"]["numerics"]  # logged and recorded either way


def test_a_full_disk_at_the_checkpoint_names_the_disk_and_the_space_needed(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    """The issue's case: torch's "unexpected pos 832 vs 726", with no file named."""
    with tiny_disk(tmp_path / "checkpoints", size="16k") as disk:
        with pytest.raises(
            OutputError,
            match=rf"{re.escape(str(disk))}/: no space left on the "
            r"disk mounted at .* this write needs \d+\.\d [KM]iB",
        ):
            train.fn(small_params, processed_dir, tmp_path / "w.pth", tmp_path / "l", disk / "c.pt")
        assert list(disk.iterdir()) == []
    assert not (tmp_path / "w.pth").exists()


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_bf16_steps_with_the_fused_optimizer_and_fp32_with_the_portable_one(optimizer: str) -> None:
    fp32 = Params().train.model_copy(update={"optimizer": optimizer})
    bf16 = fp32.model_copy(update={"precision": "bf16"})
    model = NeuralNetwork([4])
    assert not stages.train.make_optimizer(model, fp32).defaults["fused"]
    assert stages.train.make_optimizer(model, bf16).defaults["fused"]
