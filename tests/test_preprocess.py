import gzip
import json
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from stages.config import Params
from stages.dataset import FashionMNISTTensors, IndexBatchSampler, ShiftFlip, make_loader
from stages.fashion_mnist import SplitFormatError, StatsError, load_split
from stages.preprocess import IdxFormatError, preprocess, read_idx

from .helpers.data import RAW_NAMES, idx_bytes, make_split, write_gz


def test_splits_are_tensors_of_the_right_shape(processed_dir: Path) -> None:
    sizes = {}
    for split in ("train", "val", "test"):
        images, labels = load_split(processed_dir, split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (28, 28)
        assert labels.dtype == torch.int64
        sizes[split] = len(labels)
    assert sizes == {"train": 90, "val": 30, "test": 40}  # val_fraction 0.25 of 120


def test_validation_split_is_seeded_and_disjoint(
    raw_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    def val_images(seed: int) -> torch.Tensor:
        out = tmp_path / f"seed{seed}"
        preprocess.fn(small_params.model_copy(update={"seed": seed}), raw_dir, out)
        return load_split(out, "val")[0]

    assert torch.equal(val_images(1), val_images(1))
    assert not torch.equal(val_images(1), val_images(2))
    train = load_split(tmp_path / "seed1", "train")[0].flatten(1)
    val = val_images(1).flatten(1)
    assert len(train) + len(val) == 120
    assert not (train[:, None, :] == val[None, :, :]).all(-1).any()  # no image in both


def test_stats_come_from_the_train_split(processed_dir: Path) -> None:
    stats = json.loads((processed_dir / "stats.json").read_text())
    train = load_split(processed_dir, "train")[0].double() / 255
    assert stats["source"] == "train split"
    assert stats["mean"] == pytest.approx(train.mean().item(), abs=1e-6)
    assert stats["std"] == pytest.approx(train.std().item(), abs=1e-6)


def test_stats_can_come_from_params(raw_dir: Path, tmp_path: Path, small_params: Params) -> None:
    fixed = small_params.model_copy(
        update={"preprocess": small_params.preprocess.model_copy(update={"mean": 0.5, "std": 0.25})}
    )
    preprocess.fn(fixed, raw_dir, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (stats["mean"], stats["std"], stats["source"]) == (0.5, 0.25, "params.yaml")


def test_wrong_magic_number_is_refused(tmp_path: Path) -> None:
    images, _ = make_split(4, seed=0)
    path = tmp_path / "bad.gz"
    write_gz(path, idx_bytes(images, magic=0x00000801))
    with pytest.raises(IdxFormatError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(path, ndim=3)


def test_truncated_data_is_refused(tmp_path: Path) -> None:
    images, _ = make_split(4, seed=0)
    path = tmp_path / "short.gz"
    write_gz(path, idx_bytes(images)[:-10])
    with pytest.raises(IdxFormatError, match=r"header says shape \[4, 28, 28\]"):
        read_idx(path, ndim=3)


def test_not_gzip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(IdxFormatError, match="not a readable gzip file"):
        read_idx(path, ndim=1)


def test_wrong_image_size_is_refused(raw_dir: Path, tmp_path: Path, small_params: Params) -> None:
    write_gz(raw_dir / RAW_NAMES["train"][0], idx_bytes(torch.zeros(120, 14, 14)))
    with pytest.raises(IdxFormatError, match=r"images are \[14, 14\], expected 28x28"):
        preprocess.fn(small_params, raw_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range_are_refused(
    raw_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    write_gz(raw_dir / RAW_NAMES["test"][1], idx_bytes(torch.full((40,), 12)))
    with pytest.raises(IdxFormatError, match="label 12 found, expected 0..9"):
        preprocess.fn(small_params, raw_dir, tmp_path / "out")


def test_label_count_must_match_image_count(
    raw_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    write_gz(raw_dir / RAW_NAMES["test"][1], idx_bytes(torch.zeros(39)))
    with pytest.raises(IdxFormatError, match="39 labels for 40 images"):
        preprocess.fn(small_params, raw_dir, tmp_path / "out")


def test_missing_raw_file_says_which_stage_to_run(tmp_path: Path, small_params: Params) -> None:
    with pytest.raises(IdxFormatError, match="missing; run the download stage first"):
        preprocess.fn(small_params, tmp_path, tmp_path / "out")


def test_processed_file_with_wrong_dtype_is_refused(processed_dir: Path) -> None:
    images, labels = load_split(processed_dir, "test")
    torch.save({"images": images.float(), "labels": labels}, processed_dir / "test.pt")
    with pytest.raises(
        SplitFormatError, match=r"images must be uint8 \[N,28,28\], got torch.float32"
    ):
        load_split(processed_dir, "test")


def test_custom_dataset_items_and_batches_agree(processed_dir: Path) -> None:
    images, labels = load_split(processed_dir, "test")
    dataset = FashionMNISTTensors(images, labels, mean=0.3, std=0.4)
    assert len(dataset) == 40
    x, y = dataset[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == int(labels[3])
    assert torch.allclose(x, (images[3].float() / 255 - 0.3) / 0.4)
    xb, yb = dataset.__getitems__([3, 5])
    assert torch.equal(xb[0], x) and yb.tolist() == [labels[3].item(), labels[5].item()]
    batches = list(make_loader(dataset, batch_size=16, shuffle=False))
    assert [len(b[1]) for b in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


@pytest.mark.parametrize("augmented", [False, True])
def test_bf16_batches_hold_what_autocast_makes_of_the_fp32_ones(
    processed_dir: Path, augmented: bool
) -> None:
    images, labels = load_split(processed_dir, "test")

    def batch(dtype: torch.dtype) -> torch.Tensor:
        flip = ShiftFlip(1, hflip=True, generator=torch.Generator().manual_seed(0))
        dataset = FashionMNISTTensors(
            images, labels, 0.3, 0.4, augment=flip if augmented else None, dtype=dtype
        )
        return dataset.__getitems__(torch.arange(8))[0]

    fp32, bf16 = batch(torch.float32), batch(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    linear = torch.nn.Linear(28 * 28, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(bf16.flatten(1)), linear(fp32.flatten(1)))
    assert torch.equal(bf16, fp32.to(torch.bfloat16))


def test_index_batch_sampler_is_seeded_and_covers_every_sample() -> None:
    def order(seed: int) -> list[torch.Tensor]:
        return list(
            IndexBatchSampler(10, 4, shuffle=True, generator=torch.Generator().manual_seed(seed))
        )

    batches = order(3)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(batches, order(3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches, order(4), strict=True))
    assert torch.equal(torch.cat(list(IndexBatchSampler(10, 4, shuffle=False))), torch.arange(10))


def test_shift_flip_moves_pixels_without_changing_labels(processed_dir: Path) -> None:
    images, labels = load_split(processed_dir, "test")
    flip_only = ShiftFlip(0, hflip=True, generator=torch.Generator().manual_seed(0))
    flipped = flip_only(images)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()

    shifted = ShiftFlip(2, hflip=False, generator=torch.Generator().manual_seed(0))(images)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, images)
    dataset = FashionMNISTTensors(images, labels, 0.3, 0.4, augment=flip_only)
    assert torch.equal(dataset.__getitems__(torch.arange(5))[1], labels[:5])


def write_gzip_bomb(path: Path, header: bytes, zeros_mib: int) -> None:
    """`header` and then `zeros_mib` MiB of zeros, gzipped: a few hundred KB on disk. Built from
    one compressed member repeated (gzip readers join members into one stream), so it is quick."""
    member = gzip.compress(bytes(8 << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(header, mtime=0))
        for _ in range(zeros_mib // 8):
            handle.write(member)


def test_a_gzip_bomb_is_refused_after_reading_no_more_than_the_header_announces(
    tmp_path: Path,
) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_gzip_bomb(path, struct.pack(">4I", 0x803, 4, 28, 28), zeros_mib=200)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(
            IdxFormatError,
            match=rf"{re.escape(str(path))}: header says shape \[4, 28, 28\] \(3136 bytes\), "
            r"file holds more data than that",
        ):
            read_idx(path, ndim=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the 200 MiB were never decompressed into memory


@pytest.mark.parametrize(
    ("header", "ndim", "error"),
    [
        (struct.pack(">4I", 0x803, 4_000_000_000, 28, 28), 3, "header says 4000000000 images"),
        (struct.pack(">4I", 0x803, 10, 60_000, 60_000), 3, r"images are \[60000, 60000\]"),
        (
            struct.pack(
                ">2I",
                0x801,
                100_001,
            ),
            1,
            "header says 100001 labels, expected at most",
        ),
    ],
)
def test_an_absurd_idx_header_is_refused_before_reading_the_data(
    tmp_path: Path, header: bytes, ndim: int, error: str
) -> None:
    path = tmp_path / "raw.gz"
    write_gzip_bomb(path, header, zeros_mib=64)
    what = "images" if ndim == 3 else "labels"
    item_shape = (28, 28) if ndim == 3 else None
    tracemalloc.start()
    try:
        with pytest.raises(IdxFormatError, match=rf"{re.escape(str(path))}: {error}"):
            read_idx(path, ndim=ndim, item_shape=item_shape, what=what)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_corrupt_deflate_data_is_named_not_a_traceback(tmp_path: Path) -> None:
    images, _ = make_split(4, seed=0)
    compressed = bytearray(gzip.compress(idx_bytes(images), mtime=0))
    compressed[20:40] = bytes(range(20))  # damage the deflate stream after the gzip header
    path = tmp_path / "damaged.gz"
    path.write_bytes(bytes(compressed))
    with pytest.raises(IdxFormatError, match=rf"{re.escape(str(path))}: not a readable gzip"):
        read_idx(path, ndim=3)


def test_blank_train_images_are_refused_before_stats_are_written(
    raw_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    images_file = raw_dir / RAW_NAMES["train"][0]
    write_gz(images_file, idx_bytes(torch.full((120, 28, 28), 7)))
    expected = rf"{re.escape(str(images_file))}: the train split's pixel std = 0.0: expected a"
    with pytest.raises(StatsError, match=expected):
        preprocess.fn(small_params, raw_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tiny_std_from_params_is_refused_naming_the_key(
    raw_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    section = small_params.preprocess.model_copy(update={"mean": 0.5, "std": 1e-45})
    with pytest.raises(StatsError, match=r"^preprocess\.std = 1e-45: expected a number from 0.001"):
        preprocess.fn(
            small_params.model_copy(update={"preprocess": section}), raw_dir, tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()
