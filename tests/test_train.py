from pathlib import Path

import pytest
import torch

from stages.artifacts import load_torch
from stages.config import Params
from stages.errors import StageError
from stages.model import NeuralNetwork
from stages.train import train


def test_the_seed_network_shape() -> None:
    model = NeuralNetwork()
    assert isinstance(model.flatten, torch.nn.Flatten)
    assert [tuple(p.shape) for p in model.parameters()] == [
        (512, 784), (512,), (512, 512), (512,), (10, 512), (10,)
    ]  # fmt: skip
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_weights_load_strictly_into_a_fresh_instance(trained: dict[str, Path]) -> None:
    state = torch.load(trained["weights_path"], weights_only=True)
    assert list(state)[:2] == ["linear_relu_stack.0.weight", "linear_relu_stack.0.bias"]
    NeuralNetwork().load_state_dict(state, strict=True)


def test_curves_are_logged_per_epoch(trained: dict[str, Path]) -> None:
    curves = trained["live_dir"] / "plots" / "metrics"
    for name in ("train/loss", "val/loss", "val/accuracy"):
        lines = (curves / f"{name}.tsv").read_text().splitlines()
        assert len(lines) == 1 + 2  # header + epochs
    assert "val" in (trained["live_dir"] / "metrics.json").read_text()


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


def test_divergence_names_epoch_and_learning_rate(
    tmp_path: Path, processed_dir: Path, small_params: Params
) -> None:
    p = small_params.train.model_copy(update={"optimizer": "sgd", "learning_rate": 1e30})
    with pytest.raises(StageError, match=r"loss nan in epoch 1 with train.learning_rate = 1e\+30"):
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
