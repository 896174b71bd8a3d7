"""The network from PyTorch's "Learn the Basics": Flatten -> Linear/ReLU stack -> 10 logits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from stages.artifacts import load_torch
from stages.errors import StageError

IMAGE_SIZE = 28 * 28
NUM_CLASSES = 10


class NeuralNetwork(nn.Module):
    """The tutorial's model; hidden_sizes=(512, 512) gives its exact 784-512-512-10 layers."""

    def __init__(self, hidden_sizes: Sequence[int] = (512, 512)) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width = IMAGE_SIZE
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.linear_relu_stack = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


@torch.no_grad()
def test_loop(dataloader: Iterable, model: nn.Module) -> tuple[float, torch.Tensor]:
    """The tutorial's test loop: mean cross-entropy over the split, and every prediction."""
    model.eval()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    count = 0
    predictions = []
    for x, y in dataloader:
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        predictions.append(logits.argmax(dim=1))
        count += y.shape[0]
    return loss_sum.item() / max(count, 1), torch.cat(predictions).cpu()


def load_model(
    weights_path: Path, hidden_sizes: Sequence[int], device: torch.device | str = "cpu"
) -> NeuralNetwork:
    """A fresh NeuralNetwork with the saved state_dict, loaded strictly."""
    try:
        state = load_torch(weights_path)
    except FileNotFoundError:
        raise StageError(f"{weights_path}: missing") from None
    except Exception as exc:
        raise StageError(f"{weights_path}: not a loadable state_dict ({exc})") from None
    model = NeuralNetwork(hidden_sizes)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise StageError(
            f"{weights_path}: does not fit NeuralNetwork(hidden_sizes={hidden_sizes}): {exc}"
        ) from None
    return model.to(device)
