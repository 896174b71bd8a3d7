"""The tutorial's custom Dataset, over one split held as whole tensors (docs/architecture.md,
"Design decisions").

`preprocess` writes each split as `{"images": uint8 [N,28,28], "labels": int64 [N]}`
(stages/fashion_mnist.py); train and evaluate load it with `load_dataset`, move it to the device
once, and batch it by indexing. Also the training augmentation, `ShiftFlip`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from stages.fashion_mnist import check_split, load_split, load_stats


class ShiftFlip:
    """Training augmentation on a whole uint8 batch: random shifts of up to `max_shift` pixels
    (zero padded) and, with `hflip`, random left-right flips; one gather, no per-sample calls."""

    def __init__(self, max_shift: int, hflip: bool, generator: torch.Generator) -> None:
        self.max_shift = max_shift
        self.hflip = hflip
        self.generator = generator  # on the CPU: the same draws whatever the device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count, device = images.shape[0], images.device
        if self.hflip:
            flip = torch.rand(count, generator=self.generator) < 0.5
            images = torch.where(flip.to(device)[:, None, None], images.flip(-1), images)
        if self.max_shift:
            m = self.max_shift
            padded = nn.functional.pad(images, (m, m, m, m))
            offsets = torch.randint(0, 2 * m + 1, (2, count), generator=self.generator).to(device)
            grid = torch.arange(images.shape[-1], device=device)
            rows = (offsets[0, :, None] + grid)[:, :, None]
            cols = (offsets[1, :, None] + grid)[:, None, :]
            images = padded[torch.arange(count, device=device)[:, None, None], rows, cols]
        return images


# A normalisation: one mean and std for all pixels (stats.json's), or per pixel, [1,28,28] each.
Stat = float | torch.Tensor


def normalize_images(images: torch.Tensor, mean: Stat, std: Stat) -> torch.Tensor:
    """ToTensor's 0..1 scaling and Normalize(mean, std), on a whole uint8 batch [N,28,28] at once;
    the result is float32 [N,1,28,28]."""
    scaled = images.unsqueeze(-3).to(torch.float32).div_(255.0)
    return scaled.sub_(mean).div_(std)


def pixel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's mean and std over uint8 `images` [N,28,28] on the 0..1 scale, as float32
    [1,28,28] for normalize_images. A pixel's std below the std of all pixels is raised to it:
    the border pixels hardly vary, and dividing by their own std would blow up the rare stroke
    that reaches them."""
    pixels = images.to(torch.float64).div_(255.0)
    std = pixels.std(0).clamp_min(pixels.std().item())
    return pixels.mean(0).unsqueeze(0).float(), std.unsqueeze(0).float()


class FashionMNISTTensors(Dataset):
    """One split as tensors on one device; items come out normalised, shaped [1,28,28].

    Without augmentation every epoch reads the same normalised images, so they are normalised
    once, here (4 bytes a pixel instead of 1), and a batch is one gather. With augmentation the
    uint8 images are kept, and each batch is augmented, then normalised. `dtype` bfloat16 (for
    train.precision bf16) stores what autocast's first cast would make of each normalised batch:
    the same values, half the bytes to gather."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Stat,
        std: Stat,
        device: torch.device | str = "cpu",
        augment: ShiftFlip | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_split(images, labels, "FashionMNISTTensors")
        self.labels = labels.to(device)
        self.mean = mean.to(device) if isinstance(mean, torch.Tensor) else mean
        self.std = std.to(device) if isinstance(std, torch.Tensor) else std
        self.augment = augment
        self.dtype = dtype
        images = images.to(device)
        self.images = images if augment is not None else self.normalize(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std).to(self.dtype)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is not None:
            return self.normalize(self.images[index]), self.labels[index]
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # DataLoader hands a whole batch of indices here: one gather instead of a call per sample.
        index = torch.as_tensor(indices).to(self.labels.device, non_blocking=True)
        images = self.images.index_select(0, index)
        if self.augment is not None:
            images = self.normalize(self.augment(images))
        return images, self.labels.index_select(0, index)


class IndexBatchSampler(Sampler[torch.Tensor]):
    """Yields each batch's indices as one tensor: a slice of a per-epoch permutation drawn from
    the seeded generator (or of 0..n-1), so no Python work happens per sample."""

    def __init__(
        self, size: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.skip = 0  # batches the next epoch leaves out at its start: a resumed epoch's done part

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=self.generator)
        else:
            order = torch.arange(self.size)
        skip, self.skip = self.skip, 0
        yield from order.split(self.batch_size)[skip:]


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def make_loader(
    dataset: FashionMNISTTensors,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A standard DataLoader whose batches are gathered by `__getitems__` in one indexing op."""
    sampler = IndexBatchSampler(len(dataset), batch_size, shuffle, generator)
    # Its own generator: each new iterator draws a base seed, which must not move torch's global
    # RNG (a resumed epoch starts one more iterator than an unbroken one).
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=_whole_batch, generator=torch.Generator()
    )


def load_dataset(
    processed_dir: Path,
    split: str,
    device: torch.device,
    augment: ShiftFlip | None = None,
    dtype: torch.dtype = torch.float32,
    stats: tuple[Stat, Stat] | None = None,
) -> FashionMNISTTensors:
    """One processed split, placed on `device` once, normalised with `stats` (mean, std), by
    default the ones preprocess chose (stats.json)."""
    images, labels = load_split(processed_dir, split)
    mean, std = stats if stats is not None else load_stats(processed_dir)
    return FashionMNISTTensors(images, labels, mean, std, device, augment, dtype)
