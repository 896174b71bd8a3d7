"""The tutorial's custom Dataset, over one split held as whole tensors (DESIGN point 6).

`preprocess` writes each split as `{"images": uint8 [N,28,28], "labels": int64 [N]}`; train and
evaluate load it with `load_split`, move it to the device once, and batch it by indexing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from stages.artifacts import load_torch
from stages.errors import StageError
from stages.model import NUM_CLASSES

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = ("train", "val", "test")


class SplitFormatError(StageError):
    """A processed split file does not hold what preprocess writes."""


def check_split(images: torch.Tensor, labels: torch.Tensor, source: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise SplitFormatError(
            f"{source}: images must be uint8 [N,28,28], got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise SplitFormatError(
            f"{source}: labels must be int64 [{images.shape[0]}], "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise SplitFormatError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}")


def split_path(processed_dir: Path, split: str) -> Path:
    return Path(processed_dir) / f"{split}.pt"


def load_split(processed_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = split_path(processed_dir, split)
    try:
        data = load_torch(path)
    except FileNotFoundError:
        raise SplitFormatError(f"{path}: missing; run the preprocess stage first") from None
    except Exception as exc:  # torch raises several types for a corrupt or unsafe file
        raise SplitFormatError(f"{path}: not a readable tensor file ({exc})") from None
    if not isinstance(data, dict) or set(data) != {"images", "labels"}:
        raise SplitFormatError(f"{path}: expected a dict with keys 'images' and 'labels'")
    check_split(data["images"], data["labels"], str(path))
    return data["images"], data["labels"]


class FashionMNISTTensors(Dataset):
    """One split as tensors on one device; items come out normalised, shaped [1,28,28]."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float,
        std: float,
        device: torch.device | str = "cpu",
    ) -> None:
        check_split(images, labels, "FashionMNISTTensors")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return self.labels.shape[0]

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """ToTensor's 0..1 scaling and Normalize(mean, std), on a whole batch at once."""
        scaled = images.unsqueeze(-3).to(torch.float32).div_(255.0)
        return scaled.sub_(self.mean).div_(self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # DataLoader hands a whole batch of indices here: one gather instead of a call per sample.
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.transform(self.images[index]), self.labels[index]


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def make_loader(
    dataset: FashionMNISTTensors,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A standard DataLoader whose batches are gathered by `__getitems__` in one indexing op."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=_whole_batch,
    )


def load_stats(processed_dir: Path) -> tuple[float, float]:
    """The normalisation (mean, std) that preprocess chose, on the 0..1 pixel scale."""
    path = Path(processed_dir) / "stats.json"
    try:
        stats = json.loads(path.read_text())
        return float(stats["mean"]), float(stats["std"])
    except FileNotFoundError:
        raise SplitFormatError(f"{path}: missing; run the preprocess stage first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SplitFormatError(
            f"{path}: expected {{'mean': float, 'std': float}} ({exc})"
        ) from None


def load_dataset(processed_dir: Path, split: str, device: torch.device) -> FashionMNISTTensors:
    """One processed split, normalised with the stats preprocess chose, placed on `device` once."""
    images, labels = load_split(processed_dir, split)
    mean, std = load_stats(processed_dir)
    return FashionMNISTTensors(images, labels, mean, std, device)
