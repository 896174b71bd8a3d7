"""Bad input through the real `dvc repro`: each case names the culprit and what was expected,
exits non-zero, changes no out and leaves dvc.lock as it was (docs/robustness.md "Bad input")."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
import yaml

from .helpers.data import restamp_record
from .helpers.repo import edit_params
from .helpers.tools import dvc, free_port, stages_run
from .test_artifacts import _Payload

pytestmark = pytest.mark.e2e

TRAIN_IMAGES = "data/raw/train-images-idx3-ubyte.gz"
TRAIN_LABELS = "data/raw/train-labels-idx1-ubyte.gz"


def snapshot(repo: Path) -> dict[str, str]:
    """sha256 of every file under the folders that hold outs, and of dvc.lock twice: as it is
    ("dvc.lock") and without its `validate` entry ("dvc.lock validated"). Params that pass
    validation and then fail in a later stage were validated, and DVC records that truly."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    hashes = {"dvc.lock": hashlib.sha256(yaml.safe_dump(lock).encode()).hexdigest()}
    lock["stages"].pop("validate")
    hashes["dvc.lock validated"] = hashlib.sha256(yaml.safe_dump(lock).encode()).hexdigest()
    for folder in ("data", "models", "reports"):
        for p in sorted((repo / folder).rglob("*")):
            if p.is_file():
                hashes[str(p.relative_to(repo))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashes


def rewrite_idx(repo: Path, name: str, edit: Callable[[bytearray], None]) -> None:
    path = repo / name
    data = bytearray(gzip.decompress(path.read_bytes()))
    edit(data)
    path.write_bytes(gzip.compress(bytes(data), compresslevel=1, mtime=0))  # level 9: 10 s


def damaged_mirror(tmp_path: Path, real_mirror: Path, damage: Callable[[bytes], bytes]) -> str:
    mirror = tmp_path / "mirror"
    shutil.copytree(real_mirror, mirror)
    labels = mirror / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(damage(labels.read_bytes()))
    return str(mirror)


def flip_byte(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]


def resave_split(repo: Path, split: str, change: Callable[[dict], dict]) -> None:
    path = repo / "data/processed" / f"{split}.pt"
    torch.save(change(torch.load(path, weights_only=True)), path)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """chmod for a normal user; root ignores modes, so as root the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make {folder} read-only as root: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# Each case: (id, what it does to the repo -> (dvc repro args, extra env), expected message).
Setup = Callable[[Path, Path, Path], tuple[list[str], dict[str, str]]]


def params_text(text: str) -> Setup:
    def setup(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
        (repo / "params.yaml").write_text(text)
        return [], {}

    return setup


def params(**sections) -> Setup:
    def setup(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
        edit_params(repo, **sections)
        return [], {}

    return setup


def raw_file(name: str, edit: Callable[[bytearray], None]) -> Setup:
    def setup(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
        rewrite_idx(repo, name, edit)
        return ["-s", "preprocess"], {}

    return setup


def processed_split(change: Callable[[dict], dict], restamp: bool = True) -> Setup:
    """Train on a changed split file; with `restamp`, as if preprocess had written it (else
    preprocess's record gives it away)."""

    def setup(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
        resave_split(repo, "train", change)
        if restamp:
            restamp_record(repo / "data/processed")
        return ["-s", "train"], {}

    return setup


def mirror_env(make: Callable[[Path, Path], str]) -> Setup:
    def setup(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
        edit_params(repo, download={"retries": 2, "backoff_s": 0.0})
        return ["-s", "download"], {"FMNIST_MIRROR": make(tmp, mirror)}

    return setup


def set_magic(data: bytearray) -> None:
    data[:4] = (0x0803).to_bytes(4, "big")


def set_shape(data: bytearray) -> None:
    data[8:16] = (14).to_bytes(4, "big") + (56).to_bytes(4, "big")


def set_label_10(data: bytearray) -> None:
    data[8 + 5] = 10


def dead_prefect(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
    edit_params(repo, train={"learning_rate": 0.05})
    return [], {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}


def pickled_code(repo: Path, tmp: Path, mirror: Path) -> tuple[list[str], dict[str, str]]:
    torch.save(
        {"images": _Payload(tmp / "pwned"), "labels": None}, repo / "data/processed/train.pt"
    )
    restamp_record(repo / "data/processed")  # else the record check refuses it before loading
    return ["-s", "train"], {}


def models_symlinked_outside(
    repo: Path, tmp: Path, mirror: Path
) -> tuple[list[str], dict[str, str]]:
    shutil.move(repo / "models", tmp / "models")
    (repo / "models").symlink_to(tmp / "models")
    edit_params(repo, train={"learning_rate": 0.05})
    return [], {}


CASES: list[tuple[str, Setup, str]] = [
    (
        "yaml-syntax",
        params_text("train: [epochs: 1\n"),
        "'params.yaml', YAML file structure is corrupted: while parsing a flow sequence\n"
        '  in "<unicode string>", line 1, column 8',
    ),
    (
        # No stage but validate tracks this key: it stops the run, and nothing else reruns.
        "misspelt-section",
        params(trian={"epochs": 3}),
        "error: validate: params.yaml: invalid parameters\n"
        "  trian = {{'epochs': 3}}: unknown key; allowed keys here: seed, device, download",
    ),
    (
        "unknown-key",
        params(train={"lerning_rate": 0.01}),
        "train.lerning_rate = 0.01: unknown key; allowed keys here: epochs, batch_size",
    ),
    (
        "wrong-type",
        params(train={"epochs": "ten"}),
        "train.epochs = 'ten': Input should be a valid integer",
    ),
    (
        "learning-rate-zero",
        params(train={"learning_rate": 0}),
        "train.learning_rate = 0: Input should be greater than 0",
    ),
    (
        "learning-rate-negative",
        params(train={"learning_rate": -1}),
        "train.learning_rate = -1: Input should be greater than 0",
    ),
    (
        "batch-size-zero",
        params(train={"batch_size": 0}),
        "train.batch_size = 0: Input should be greater than 0",
    ),
    (
        "batch-larger-than-split",
        params(train={"batch_size": 100000}),
        "train.batch_size = 100000: larger than the train split (54000)",
    ),
    (
        "epochs-zero",
        params(train={"epochs": 0}),
        "train.epochs = 0: Input should be greater than 0",
    ),
    (
        "hidden-sizes-empty",
        params(train={"hidden_sizes": []}),
        "train.hidden_sizes = []: List should have at least 1 item",
    ),
    (
        "val-fraction-one",
        params(preprocess={"val_fraction": 1.0}),
        "preprocess.val_fraction = 1.0: Input should be less than 1",
    ),
    (
        "val-fraction-zero",
        params(preprocess={"val_fraction": 0.0}),
        "preprocess.val_fraction = 0.0: Input should be greater than 0",
    ),
    (
        "unknown-optimizer",
        params(train={"optimizer": "rmsprop"}),
        "train.optimizer = 'rmsprop': Input should be 'sgd', 'adam' or 'adamw'",
    ),
    ("cuda-missing", params(device="cuda"), "device = 'cuda': CUDA is not available"),
    (
        "corrupted-raw-file",
        mirror_env(lambda t, m: damaged_mirror(t, m, flip_byte)),
        "t10k-labels-idx1-ubyte.gz from {mirror}: md5 ",
    ),
    (
        "truncated-raw-file",
        mirror_env(lambda t, m: damaged_mirror(t, m, lambda d: d[:1000])),
        "t10k-labels-idx1-ubyte.gz from {mirror}: md5 ",
    ),
    (
        "missing-mirror",
        mirror_env(lambda t, m: str(t / "absent")),
        "not a folder or an http(s) URL",
    ),
    (
        "unreachable-mirror",
        mirror_env(lambda t, m: f"http://127.0.0.1:{free_port()}"),
        "unreachable after 2 attempts",
    ),
    (
        "wrong-idx-magic",
        raw_file(TRAIN_LABELS, set_magic),
        f"{TRAIN_LABELS}: IDX magic number 0x00000803, expected 0x00000801",
    ),
    (
        "wrong-idx-shape",
        raw_file(TRAIN_IMAGES, set_shape),
        f"{TRAIN_IMAGES}: images are [14, 56], expected 28x28",
    ),
    (
        "label-out-of-range",
        raw_file(TRAIN_LABELS, set_label_10),
        f"{TRAIN_LABELS}: label 10 found, expected 0..9",
    ),
    (
        "processed-wrong-dtype",
        processed_split(lambda d: {**d, "images": d["images"].float()}),
        "data/processed/train.pt: images must be uint8 [N,28,28], got torch.float32",
    ),
    (
        "processed-wrong-shape",
        processed_split(lambda d: {**d, "labels": d["labels"][:-1]}),
        "data/processed/train.pt: labels must be int64 [54000], got torch.int64 [53999]",
    ),
    ("pickled-code", pickled_code, "data/processed/train.pt: not a readable tensor file"),
    (
        "processed-changed-after-preprocess",
        processed_split(lambda d: {**d, "labels": d["labels"].flip(0)}, restamp=False),
        "data/processed/train.pt: sha256 ",
    ),
    ("models-symlinked-outside", models_symlinked_outside, "(models is a symlink)"),
    (
        "read-only-output-folder",
        params(train={"learning_rate": 0.05}),
        # DVC removes a stage's outs before it runs, and names the one it cannot remove.
        "Operation not permitted: '{repo}/models/train/model_weights.pth'",
    ),
    (
        "non-finite-loss",
        params(train={"optimizer": "sgd", "learning_rate": 1e30}),
        "training diverged: loss nan at epoch 1, step 2 (batch 2 of 422), "
        "learning rate 4.01501e+28 (train.learning_rate = 1e+30)",
    ),
    ("dead-prefect-server", dead_prefect, "no Prefect server answers at PREFECT_API_URL="),
]


@pytest.mark.parametrize(("setup", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_culprit_and_changes_nothing(
    pipeline_copy: Path,
    tmp_path: Path,
    real_mirror: Path,
    setup: Setup,
    message: str,
    request: pytest.FixtureRequest,
) -> None:
    case = request.node.callspec.id
    if case == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, env = setup(pipeline_copy, tmp_path, real_mirror)
    before = snapshot(pipeline_copy)
    folder = pipeline_copy / "models/train"
    with read_only(folder) if case == "read-only-output-folder" else nullcontext():
        result = dvc(pipeline_copy, "repro", *args, check=False, **env)
    assert result.returncode != 0, result.stdout
    expected = message.format(mirror=env.get("FMNIST_MIRROR"), repo=pipeline_copy)
    assert expected in result.stderr, result.stderr
    ran = stages_run(result.stdout)
    validated = ran[:1] == ["validate"] and "error: validate:" not in result.stderr
    after = snapshot(pipeline_copy)
    if validated:  # the one change allowed: validate's entry in dvc.lock
        after["dvc.lock"] = before["dvc.lock"]
    assert after == before
    assert not (tmp_path / "pwned").exists()
    if case == "misspelt-section":
        assert ran == ["validate"]
    ran = ran[1:] if ran[:1] == ["validate"] else ran  # it runs first whenever params change
    assert ran in ([], ["download"], ["preprocess"], ["train"])
