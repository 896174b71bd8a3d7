"""python -m stages.preprocess

Parses the raw IDX files in data/raw/ (checking magic numbers, shapes and labels), carves a
validation split off train with the seed, and writes each split as one tensor file to
data/processed/{train,val,test}.pt (uint8 images [N,28,28], int64 labels [N]), plus
data/processed/stats.json with the normalisation mean and std (from the train split, or params),
and data/processed/record.json: the params it used and the sha256 of what it read and wrote.
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("preprocess", __doc__)

import gzip
import math
import struct
import zlib
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NONE

from stages.artifacts import atomic_dir, require_writable, write_json
from stages.config import PROCESSED_DIR, RAW_DIR, Params
from stages.errors import StageError
from stages.fashion_mnist import (
    IMAGE_SIDE,
    NUM_CLASSES,
    RAW_FILES,
    STATS_FILE,
    StatsError,
    save_split,
    stats_problem,
)
from stages.records import RECORD_FILE, digests, make_record
from stages.runtime import run_cli, stage_logger

IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes


class IdxFormatError(StageError):
    """A raw file is not the IDX file it should be."""


# No FashionMNIST file holds more (60,000 train, 10,000 test): a larger count in a header is a
# corrupt or hostile file, refused before anything is allocated or decompressed.
MAX_ITEMS = 100_000


def _read_exactly(handle: gzip.GzipFile, count: int) -> bytearray:
    """Up to `count` bytes from the stream, fewer only at its end; never decompresses more."""
    buffer = bytearray(count)
    view, filled = memoryview(buffer), 0
    while filled < count:
        got = handle.readinto(view[filled:])
        if not got:
            break
        filled += got
    view.release()
    del buffer[filled:]
    return buffer


def read_idx(
    path: Path, ndim: int, item_shape: tuple[int, ...] | None = None, what: str = "items"
) -> torch.Tensor:
    """Reads a gzipped IDX file of unsigned bytes with `ndim` dimensions (magic 0x000008NN).

    The header is read first and checked (at most MAX_ITEMS `what`, each of `item_shape` when
    given); then exactly the bytes it announces and one more, to refuse trailing data. A gzip
    bomb is never decompressed past the size a real file would have.
    """
    try:
        with gzip.open(path, "rb") as handle:
            return _parse_idx(handle, path, ndim, item_shape, what)
    except FileNotFoundError:
        raise IdxFormatError(f"{path}: missing; run the download stage first") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{path}: not a readable gzip file ({exc})") from None


def _parse_idx(
    handle: gzip.GzipFile,
    path: Path,
    ndim: int,
    item_shape: tuple[int, ...] | None,
    what: str,
) -> torch.Tensor:
    expected_magic = (IDX_UBYTE << 8) | ndim
    head = _read_exactly(handle, 4)
    magic = int.from_bytes(head, "big") if len(head) == 4 else None
    if magic != expected_magic:
        found = "none (file too short)" if magic is None else f"0x{magic:08x}"
        raise IdxFormatError(
            f"{path}: IDX magic number {found}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s))"
        )
    dims = _read_exactly(handle, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise IdxFormatError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", dims)
    if shape[0] > MAX_ITEMS:
        raise IdxFormatError(
            f"{path}: header says {shape[0]} {what}, expected at most {MAX_ITEMS} "
            "(FashionMNIST has 60000 train and 10000 test)"
        )
    if item_shape is not None and tuple(shape[1:]) != item_shape:
        raise IdxFormatError(
            f"{path}: {what} are {list(shape[1:])}, expected {'x'.join(map(str, item_shape))}"
        )
    expected_bytes = math.prod(shape)
    data = _read_exactly(handle, expected_bytes + 1)  # one byte more tells trailing data apart
    if len(data) != expected_bytes:
        held = (
            f"{len(data)} bytes of data"
            if len(data) < expected_bytes
            else "more data than that (a corrupt file, or a gzip bomb)"
        )
        raise IdxFormatError(
            f"{path}: header says shape {list(shape)} ({expected_bytes} bytes), file holds {held}"
        )
    if not data:  # frombuffer refuses an empty buffer
        return torch.zeros(shape, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8).reshape(shape)


def read_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_file, labels_file = (Path(raw_dir) / name for name in RAW_FILES[split])
    images = read_idx(images_file, ndim=3, item_shape=(IMAGE_SIDE, IMAGE_SIDE), what="images")
    labels = read_idx(labels_file, ndim=1, what="labels")
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
    problem = stats_problem(mean, std)
    if problem is not None:  # never written: train would divide by it
        if source == "params.yaml":
            raise StatsError(f"preprocess.{problem}")
        raise StatsError(
            f"{Path(raw_dir) / RAW_FILES['train'][0]}: the train split's pixel {problem}; "
            "are the images blank? (or set preprocess.mean and preprocess.std in params.yaml)"
        )
    with atomic_dir(Path(processed_dir)) as staging:
        for split, (images, labels) in {"train": train, "val": val, "test": test}.items():
            save_split(images, labels, staging, split)
            log.info("%s: %d images", split, labels.shape[0])
        write_json({"mean": mean, "std": std, "source": source}, Path(staging) / STATS_FILE)
        raw = [Path(raw_dir) / name for names in RAW_FILES.values() for name in names]
        used = {"seed": params.seed, "preprocess": params.preprocess.model_dump(mode="json")}
        made = digests(*(p for p in sorted(Path(staging).iterdir()) if p.name != RECORD_FILE))
        write_json(
            make_record("preprocess", used, digests(*raw), made), Path(staging) / RECORD_FILE
        )
    log.info("normalisation from %s: mean %.4f, std %.4f", source, mean, std)
    return {"mean": mean, "std": std}


def main(argv: list[str] | None = None) -> int:
    return run_cli(preprocess, parse_args("preprocess", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(preprocess, ARGS))
