"""python -m stages.preprocess

Parses the raw IDX files in data/raw/ (checking magic numbers, shapes and labels), carves a
validation split off train with the seed, and writes each split as one tensor file to
data/processed/{train,val,test}.pt (uint8 images [N,28,28], int64 labels [N]), plus
data/processed/stats.json with the normalisation mean and std (from the train split, or params).
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("preprocess", __doc__)

import gzip
import math
import struct
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE

from stages.artifacts import atomic_dir, require_writable, write_json
from stages.config import PROCESSED_DIR, RAW_DIR, Params
from stages.errors import StageError
from stages.fashion_mnist import IMAGE_SIDE, NUM_CLASSES, RAW_FILES, STATS_FILE, save_split
from stages.runtime import run_cli, stage_logger

IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes


class IdxFormatError(StageError):
    """A raw file is not the IDX file it should be."""


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Reads a gzipped IDX file of unsigned bytes with `ndim` dimensions (magic 0x000008NN)."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise IdxFormatError(f"{path}: missing; run the download stage first") from None
    except (OSError, EOFError) as exc:
        raise IdxFormatError(f"{path}: not a readable gzip file ({exc})") from None
    expected_magic = (IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        found = "none (file too short)" if magic is None else f"0x{magic:08x}"
        raise IdxFormatError(
            f"{path}: IDX magic number {found}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s))"
        )
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise IdxFormatError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected_bytes = math.prod(shape)
    if len(data) - header_end != expected_bytes:
        raise IdxFormatError(
            f"{path}: header says shape {list(shape)} ({expected_bytes} bytes), "
            f"file holds {len(data) - header_end} bytes of data"
        )
    return torch.frombuffer(bytearray(data[header_end:]), dtype=torch.uint8).reshape(shape)


def read_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_file, labels_file = (Path(raw_dir) / name for name in RAW_FILES[split])
    images = read_idx(images_file, ndim=3)
    labels = read_idx(labels_file, ndim=1)
    if tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(
            f"{images_file}: images are {list(images.shape[1:])}, "
            f"expected {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if labels.shape[0] != images.shape[0]:
        raise IdxFormatError(
            f"{labels_file}: {labels.shape[0]} labels for {images.shape[0]} images in {images_file}"
        )
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise IdxFormatError(
            f"{labels_file}: label {int(labels.max())} found, expected 0..{NUM_CLASSES - 1}"
        )
    return images, labels.to(torch.int64)


def split_off_validation(
    images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random `fraction` of train becomes validation; both keep their original order."""
    count = images.shape[0]
    val_count = round(count * fraction)
    if not 0 < val_count < count:
        raise StageError(
            f"preprocess.val_fraction = {fraction}: gives {val_count} of {count} train "
            "images for validation; expected at least one in each split"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:val_count].sort().values, order[val_count:].sort().values
    return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of all pixels on the 0..1 scale, in float64 so the result is exact to print."""
    pixels = images.to(torch.float64).div_(255.0)
    return round(pixels.mean().item(), 6), round(pixels.std().item(), 6)


@task(name="preprocess", cache_policy=NONE, persist_result=False)
def preprocess(
    params: Params, raw_dir: Path = RAW_DIR, processed_dir: Path = PROCESSED_DIR
) -> dict[str, float]:
    log = stage_logger("preprocess")
    require_writable(processed_dir)
    train_images, train_labels = read_split(raw_dir, "train")
    test = read_split(raw_dir, "test")
    train, val = split_off_validation(
        train_images, train_labels, params.preprocess.val_fraction, params.seed
    )
    if params.preprocess.mean is None:
        mean, std = pixel_stats(train[0])
        source = "train split"
    else:
        mean, std = params.preprocess.mean, params.preprocess.std
        source = "params.yaml"
    with atomic_dir(Path(processed_dir)) as staging:
        for split, (images, labels) in {"train": train, "val": val, "test": test}.items():
            save_split(images, labels, staging, split)
            log.info("%s: %d images", split, labels.shape[0])
        write_json({"mean": mean, "std": std, "source": source}, Path(staging) / STATS_FILE)
    log.info("normalisation from %s: mean %.4f, std %.4f", source, mean, std)
    return {"mean": mean, "std": std}


def main(argv: list[str] | None = None) -> int:
    return run_cli(preprocess, parse_args("preprocess", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(preprocess, ARGS))
