"""What FashionMNIST is: 28x28 grayscale images of 10 classes of clothing, in four raw files.

Also the processed split files that preprocess writes and train, evaluate and export read:
data/processed/{train,val,test}.pt, each `{"images": uint8 [N,28,28], "labels": int64 [N]}`,
and data/processed/stats.json with the normalisation `{"mean", "std", "source"}`.

The facts preprocess, the Dataset and the networks share live here, so that editing the network
(stages/model.py) or the Dataset (stages/dataset.py) reruns no stage that does not use them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from stages.artifacts import load_torch, save_torch
from stages.errors import StageError

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASSES)
IMAGE_SIDE = 28  # pixels; one channel

# The official raw files of each split, (images, labels), as the download stage fetches them.
RAW_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

STATS_FILE = "stats.json"


class SplitFormatError(StageError):
    """A processed split file does not hold what preprocess writes."""


def split_path(processed_dir: Path, split: str) -> Path:
    return Path(processed_dir) / f"{split}.pt"


def check_split(images: torch.Tensor, labels: torch.Tensor, source: str) -> None:
    """Raises SplitFormatError unless images are uint8 [N,28,28] and labels int64 [N] in 0..9."""
    side = IMAGE_SIDE
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (side, side):
        raise SplitFormatError(
            f"{source}: images must be uint8 [N,{side},{side}], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise SplitFormatError(
            f"{source}: labels must be int64 [{images.shape[0]}], "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise SplitFormatError(f"{source}: labels must lie in 0..{NUM_CLASSES - 1}")


def save_split(images: torch.Tensor, labels: torch.Tensor, processed_dir: Path, split: str) -> None:
    """Writes one split file, checked first: what `load_split` reads back."""
    path = split_path(processed_dir, split)
    check_split(images, labels, str(path))
    save_torch({"images": images.clone(), "labels": labels.clone()}, path)


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


# The smallest pixel std normalisation accepts: images this uniform are blank, and dividing by
# less makes inputs in the thousands, which training would report as divergence.
MIN_STD = 1e-3


class StatsError(StageError):
    """The normalisation stats are not numbers training can divide by."""


def stats_problem(mean: float, std: float) -> str | None:
    """What is wrong with a normalisation (mean, std) on the 0..1 pixel scale, or None."""
    if not math.isfinite(mean) or not 0 <= mean <= 1:
        return f"mean = {mean}: expected a number from 0 to 1 (the pixel scale)"
    if not math.isfinite(std) or not MIN_STD <= std <= 1:
        return f"std = {std}: expected a number from {MIN_STD:g} to 1 (the pixel scale)"
    return None


def load_stats(processed_dir: Path) -> tuple[float, float]:
    """The normalisation (mean, std) that preprocess chose, on the 0..1 pixel scale."""
    path = Path(processed_dir) / STATS_FILE
    try:
        stats = json.loads(path.read_text())
        mean, std = stats["mean"], stats["std"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (mean, std)):
            raise TypeError(f"mean {mean!r}, std {std!r}")
    except FileNotFoundError:
        raise SplitFormatError(f"{path}: missing; run the preprocess stage first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SplitFormatError(
            f"{path}: expected {{'mean': float, 'std': float}} ({exc})"
        ) from None
    problem = stats_problem(float(mean), float(std))
    if problem is not None:
        if stats.get("source") == "params.yaml":
            where = (
                "it comes from preprocess.mean and preprocess.std in params.yaml: fix them there"
            )
        else:
            where = "preprocess computes it from the train split: rerun the preprocess stage"
        raise StatsError(f"{path}: {problem}; {where}")
    return float(mean), float(std)
