import os
import re
from pathlib import Path

import pytest
import torch

import stages.artifacts
from stages.artifacts import (
    OutputError,
    atomic_dir,
    atomic_path,
    atomic_paths,
    save_torch,
    write_json,
    write_text,
)

from .helpers.disk import tiny_disk


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    write_json({"v": 1}, dest)
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("killed half-way")
    assert dest.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_outs_written_together_are_replaced_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dests = [tmp_path / "metrics.json", tmp_path / "plot.png"]
    for dest in dests:
        dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_paths(*dests) as temps:
        for tmp in temps:
            tmp.write_text("new")
        raise RuntimeError("an input found bad after the outs were written")
    assert [d.read_text() for d in dests] == ["old", "old"]

    synced: list[Path] = []

    def fsync_failing_on_the_second(path: Path) -> None:
        synced.append(path)
        if len(synced) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages.artifacts, "_fsync", fsync_failing_on_the_second)
    with pytest.raises(OutputError, match="no space left"), atomic_paths(*dests) as temps:
        for tmp in temps:
            tmp.write_text("new")
    assert [d.read_text() for d in dests] == ["old", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "plot.png"]

    monkeypatch.undo()
    with atomic_paths(*dests) as temps:
        for tmp in temps:
            tmp.write_text("new")
    assert [d.read_text() for d in dests] == ["new", "new"]


def test_failed_folder_write_keeps_the_old_folder(tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    with atomic_dir(dest) as staging:
        (staging / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest) as staging:
        (staging / "a").write_text("new")
        raise RuntimeError("failed")
    assert (dest / "a").read_text() == "old"
    with atomic_dir(dest) as staging:
        (staging / "b").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_same_tensors_give_the_same_bytes(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_torch(state, tmp_path / "a.pth")
    save_torch(state, tmp_path / "b" / "other-name.pth")
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b" / "other-name.pth").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pth", weights_only=True)["w"], state["w"])


class _Payload:
    """Unpickling this runs `touch <marker>`: what a poisoned weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    from stages.config import TrainParams
    from stages.errors import StageError
    from stages.fashion_mnist import SplitFormatError, load_split
    from stages.model import load_model

    marker = tmp_path / "pwned"
    poisoned = tmp_path / "model_weights.pth"
    torch.save({"linear_relu_stack.0.weight": _Payload(marker)}, poisoned)
    with pytest.raises(StageError, match="not a loadable state_dict"):
        load_model(poisoned, TrainParams())
    (tmp_path / "processed").mkdir()
    torch.save({"images": _Payload(marker), "labels": None}, tmp_path / "processed" / "test.pt")
    with pytest.raises(SplitFormatError, match="not a readable tensor file"):
        load_split(tmp_path / "processed", "test")
    assert not marker.exists()


def test_a_killed_writers_leftovers_are_cleared_on_the_next_write(tmp_path: Path) -> None:
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    dest = tmp_path / "model_weights.pth"
    stale_file = tmp_path / f".model_weights.pth.{dead.pid}.abcd1234.tmp"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".model_weights.pth.{os.getpid()}.efgh5678.tmp"  # a writer still running
    live.write_bytes(b"busy")
    save_torch({"w": torch.zeros(2)}, dest)
    assert not stale_file.exists() and live.exists()

    folder = tmp_path / "raw"
    stale_dir = tmp_path / f".raw.{dead.pid}.abcd1234.tmp"
    stale_dir.mkdir()
    (stale_dir / "part").write_text("half")
    (tmp_path / ".raw.old").mkdir()  # killed between atomic_dir's two renames: the old folder
    (tmp_path / ".raw.old" / "a").write_text("old")
    with atomic_dir(folder) as staging:
        (staging / "a").write_text("new")
    assert (folder / "a").read_text() == "new"
    assert not stale_dir.exists() and not (tmp_path / ".raw.old").exists()


def test_an_unwritable_folder_is_named_before_any_work(tmp_path: Path) -> None:
    from stages.artifacts import OutputError, require_writable

    blocker = tmp_path / "models"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match=r"models/train/w.pth: cannot write into .*models/train/"):
        require_writable(blocker / "train" / "w.pth")


def test_a_replaced_folder_keeps_the_gitignore_files_dvc_wrote_into_it(tmp_path: Path) -> None:
    dest = tmp_path / "train"
    (dest / "plots").mkdir(parents=True)
    (dest / ".gitignore").write_text("/metrics.json\n")
    (dest / "plots" / ".gitignore").write_text("/metrics\n")
    with atomic_dir(dest) as staging:
        (staging / "plots").mkdir()
        (staging / "metrics.json").write_text("{}")
    assert (dest / ".gitignore").read_text() == "/metrics.json\n"
    assert (dest / "plots" / ".gitignore").read_text() == "/metrics\n"
    assert (dest / "metrics.json").exists()


def test_a_folder_where_a_file_out_belongs_is_named_before_any_work(tmp_path: Path) -> None:
    from stages.artifacts import OutputError, atomic_path, require_writable

    folder = tmp_path / "models" / "checkpoints" / "train.pt"
    folder.mkdir(parents=True)
    expected = rf"{re.escape(str(folder))}: is a folder, expected a file \(or nothing\) there"
    require_writable(folder)  # a folder out may replace a folder
    with pytest.raises(OutputError, match=expected):
        require_writable(tmp_path / "w.pth", folder, files=True)
    with pytest.raises(OutputError, match=expected), atomic_path(folder) as tmp:
        tmp.write_text("never renamed onto the folder")
    assert folder.is_dir() and [p.name for p in folder.parent.iterdir()] == ["train.pt"]


def test_json_outs_refuse_nan_and_infinity() -> None:
    from stages.artifacts import json_text

    assert json_text({"accuracy": 0.9}) == '{\n  "accuracy": 0.9\n}\n'
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not JSON compliant"):
            json_text({"accuracy": value})


def test_a_full_disk_names_the_folder_the_disk_and_the_space_needed(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk") as disk:
        dest = disk / "weights.pth"
        with pytest.raises(
            OutputError,
            match=rf"{re.escape(str(disk))}/: no space left on the "
            rf"disk mounted at {re.escape(str(disk))} \(64\.0 KiB free of 64\.0 KiB; "
            r"No space left on device\); this write needs 39\d\.\d KiB",
        ):
            save_torch({"w": torch.zeros(100_000)}, dest)
        with pytest.raises(OutputError, match=r"this write needs more than the .* free"):
            write_text("x" * 200_000, dest)
        assert list(disk.iterdir()) == []  # no temporary left behind
