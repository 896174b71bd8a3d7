"""Synthetic FashionMNIST-shaped IDX files, and model weights, for the unit tests."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import torch

RAW_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_bytes(array: torch.Tensor, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008NN, big-endian dims, then the data."""
    ndim = array.ndim
    magic = (0x08 << 8) | ndim if magic is None else magic
    header = struct.pack(f">I{ndim}I", magic, *array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def write_gz(path: Path, payload: bytes) -> str:
    path.write_bytes(gzip.compress(payload, mtime=0))
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose brightness band depends on the label, so a model can learn something."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    noise = torch.randint(0, 40, (count, 28, 28), generator=generator)
    band = torch.zeros(count, 28, 28, dtype=torch.int64)
    for i, label in enumerate(labels.tolist()):
        band[i, label * 2 : label * 2 + 8, :] = 200
    return (noise + band).clamp(max=255).to(torch.uint8), labels.to(torch.uint8)


def write_mirror(folder: Path, counts: tuple[int, int] = (120, 40)) -> list[tuple[str, str]]:
    """The four raw files (train, test images) in folder; returns their (name, md5)s."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for split, count in zip(("train", "test"), counts, strict=True):
        images, labels = make_split(count, seed=len(split))
        images_name, labels_name = RAW_NAMES[split]
        files.append((images_name, write_gz(folder / images_name, idx_bytes(images))))
        files.append((labels_name, write_gz(folder / labels_name, idx_bytes(labels))))
    return files


def perturb_weights(path: Path) -> None:
    """Other weights of the same shape: a rerun that got far would write different outs."""
    state = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(v.shape, generator=generator) for k, v in state.items()}, path)


def restamp_record(folder: Path) -> None:
    """Rewrites folder/record.json's output digests as if its stage had written the folder as it
    is now: for tests that stand in for a stage which wrote something unusual."""
    record_path = folder / "record.json"
    record = json.loads(record_path.read_text())
    record["outputs"] = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in record["outputs"]
    }
    record_path.write_text(json.dumps(record))


# Params for the synthetic data: the earlier Adam defaults, which learn steadily on 90 images,
# where the defaults' one-cycle peak rate of 0.1 is tuned for 54,000.
TINY_PARAMS: dict = {
    "device": "cpu",
    "download": {"retries": 2, "backoff_s": 0.0, "timeout_s": 5.0},
    "preprocess": {"val_fraction": 0.25},
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "num_threads": 1,
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "scheduler": "none",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
    },
    "evaluate": {"batch_size": 32},
}
