"""The network from PyTorch's "Learn the Basics": Flatten -> Linear/ReLU stack -> 10 logits;
and, for `train.model: cnn`, a small CNN that puts convolution blocks in front of the same stack."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
from torch import nn

from stages.artifacts import load_torch
from stages.errors import StageError
from stages.fashion_mnist import IMAGE_SIDE, NUM_CLASSES

if TYPE_CHECKING:
    from stages.config import TrainParams

IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE


def linear_relu_stack(width: int, hidden_sizes: Sequence[int]) -> nn.Sequential:
    """Linear/ReLU pairs through `hidden_sizes`, then a Linear to the 10 class logits."""
    layers: list[nn.Module] = []
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


class NeuralNetwork(nn.Module):
    """The tutorial's model; hidden_sizes=(512, 512) gives its exact 784-512-512-10 layers."""

    def __init__(self, hidden_sizes: Sequence[int] = (512, 512)) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = linear_relu_stack(IMAGE_SIZE, hidden_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


class ConvNet(nn.Module):
    """A small CNN: per entry of `conv_channels` a 3x3 Conv-BatchNorm-ReLU-MaxPool block that
    halves the image side (28 -> 14 -> 7 -> 3), then the tutorial's Flatten and Linear/ReLU
    stack."""

    def __init__(
        self, conv_channels: Sequence[int] = (32, 64), hidden_sizes: Sequence[int] = (512, 512)
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels, side = 1, IMAGE_SIDE
        for out in conv_channels:
            blocks += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, side = out, side // 2
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.linear_relu_stack = linear_relu_stack(channels * side * side, hidden_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(self.features(x)))


def kaiming_init(model: nn.Module) -> None:
    """He et al. (2015) for ReLU networks: weights ~ N(0, 2 / fan_in), zero biases.

    PyTorch's own Linear init draws from U(+-1/sqrt(fan_in)), a sixth of this variance; the
    larger start trains the tutorial's network a little better in 20 epochs (docs/results.md).
    """
    for layer in model.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class ModelTooLargeError(StageError):
    """The network the params describe cannot be held in memory."""


def parameter_count(p: TrainParams) -> int:
    """How many parameters `build_model(p)` has, counted from the params, with nothing allocated."""
    count, width = 0, IMAGE_SIZE
    if p.model == "cnn":
        channels, side = 1, IMAGE_SIDE
        for out in p.conv_channels:
            # A bias-free 3x3 conv, and BatchNorm's scale and shift (its running stats are
            # buffers, not parameters).
            count += channels * out * 3 * 3 + 2 * out
            channels, side = out, side // 2
        width = channels * side * side
    for hidden in [*p.hidden_sizes, NUM_CLASSES]:
        count += width * hidden + hidden
        width = hidden
    return count


# Training holds each float32 parameter four times over: the weight, its gradient and up to two
# optimizer moments (Adam's). Loading saved weights holds two: the file's and the network's.
TRAINING_COPIES, LOADING_COPIES = 4, 2


def require_model_fits(p: TrainParams, copies: int = TRAINING_COPIES) -> None:
    """Raises ModelTooLargeError, naming the sizes, unless `copies` float32 copies of the
    parameters of `build_model(p)` fit in the memory available now."""
    count = parameter_count(p)
    needed = count * 4 * copies
    available = psutil.virtual_memory().available
    if needed <= available:
        return
    keys = f"train.hidden_sizes = {p.hidden_sizes}"
    if p.model == "cnn":
        keys += f", train.conv_channels = {p.conv_channels}"
    held = "weights, gradients, optimizer state" if copies == TRAINING_COPIES else "weights"
    raise ModelTooLargeError(
        f"{keys}: a network of {count:,} parameters needs about {needed / 2**30:,.1f} GiB "
        f"({held}), and {available / 2**30:,.1f} GiB of memory is available; "
        "expected smaller sizes"
    )


def build_model(p: TrainParams, copies: int = TRAINING_COPIES) -> nn.Module:
    """The network `train.model` names, shaped by `train.hidden_sizes` (and `conv_channels`),
    its weights drawn as `train.init` says; refused before allocating unless `copies` of its
    parameters fit in memory."""
    require_model_fits(p, copies)
    model = (
        ConvNet(p.conv_channels, p.hidden_sizes)
        if p.model == "cnn"
        else NeuralNetwork(p.hidden_sizes)
    )
    if p.init == "kaiming":
        kaiming_init(model)
    return model


def describe(p: TrainParams) -> str:
    """The constructor call that rebuilds `build_model(p)`, as users would type it."""
    if p.model == "cnn":
        return f"ConvNet(conv_channels={p.conv_channels}, hidden_sizes={p.hidden_sizes})"
    return f"NeuralNetwork(hidden_sizes={p.hidden_sizes})"


FIRST_LAYER = "linear_relu_stack.0"  # the MLP's first Linear, the one that sees the pixels


def fold_input_normalization(
    state: dict[str, torch.Tensor],
    trained_on: tuple[torch.Tensor, torch.Tensor],
    served: tuple[float, float],
) -> dict[str, torch.Tensor]:
    """The MLP's weights, trained on inputs normalised pixel by pixel with `trained_on` (mean,
    std), rewritten to take inputs normalised with `served` (stats.json's one mean and std).

    The first Linear sees the pixels through an affine map, so this is exact up to rounding: with
    x = (p - served_mean) / served_std, W (p - mean) / std + b = W' x + b' for
    W' = W * served_std / std and b' = b + W (served_mean - mean) / std (computed in float64).
    """
    weight = state[f"{FIRST_LAYER}.weight"].double()
    bias = state[f"{FIRST_LAYER}.bias"].double()
    mean, std = (t.cpu().double().flatten() for t in trained_on)
    served_mean, served_std = served
    folded = {
        f"{FIRST_LAYER}.weight": weight * (served_std / std),
        f"{FIRST_LAYER}.bias": bias + weight @ ((served_mean - mean) / std),
    }
    return {**state, **{k: v.to(state[k].dtype) for k, v in folded.items()}}


def architecture(p: TrainParams) -> str:
    """`build_model(p)` in words, for the model card."""
    head = "-".join(map(str, [*p.hidden_sizes, NUM_CLASSES]))
    if p.model == "cnn":
        return (
            f"ConvNet: 3x3 Conv-BatchNorm-ReLU-MaxPool blocks of "
            f"{', '.join(map(str, p.conv_channels))} channels, then Flatten and Linear layers "
            f"to {head} with ReLU between them"
        )
    return f"NeuralNetwork: Flatten, then Linear layers {IMAGE_SIZE}-{head} with ReLU between them"


@torch.no_grad()
def test_losses(
    dataloader: Iterable, model: nn.Module, label_smoothings: Sequence[float]
) -> tuple[list[float], torch.Tensor]:
    """The tutorial's test loop, one forward pass per batch: the mean cross-entropy over the split
    at each of `label_smoothings` (0.0: the plain loss), and every prediction."""
    model.eval()
    device = next(model.parameters()).device
    loss_sums = [torch.zeros((), device=device) for _ in label_smoothings]
    count = 0
    predictions = []
    for x, y in dataloader:
        logits = model(x)
        for loss_sum, smoothing in zip(loss_sums, label_smoothings, strict=True):
            loss_sum += nn.functional.cross_entropy(
                logits, y, reduction="sum", label_smoothing=smoothing
            )
        predictions.append(logits.argmax(dim=1))
        count += y.shape[0]
    return [s.item() / max(count, 1) for s in loss_sums], torch.cat(predictions).cpu()


def test_loop(dataloader: Iterable, model: nn.Module) -> tuple[float, torch.Tensor]:
    """The tutorial's test loop: mean cross-entropy over the split, and every prediction."""
    (loss,), predictions = test_losses(dataloader, model, [0.0])
    return loss, predictions


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions.cpu() == labels.cpu()).double().mean().item()


def load_model(weights_path: Path, p: TrainParams, device: torch.device | str = "cpu") -> nn.Module:
    """A fresh `build_model(p)` with the saved state_dict, loaded strictly."""
    try:
        state = load_torch(weights_path)
    except FileNotFoundError:
        raise StageError(f"{weights_path}: missing; run the train stage first") from None
    except Exception as exc:
        raise StageError(f"{weights_path}: not a loadable state_dict ({exc})") from None
    model = build_model(p, LOADING_COPIES)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise StageError(f"{weights_path}: does not fit {describe(p)}: {exc}") from None
    return model.to(device)
