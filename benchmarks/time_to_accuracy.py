"""python benchmarks/time_to_accuracy.py [--seeds 0 1 2] [--fast-set train.precision=bf16 ...]

How long a user waits for a good model: the train stage with params.yaml's defaults and with the
fast profile (FAST_PROFILE, or --fast-set), each on every seed, scored on the test split as the
evaluate stage does. The kinds take turns seed by seed, so a slow spell on a shared machine hits
both. For each kind: "train_s", the stage's median wall time (`train.fn`, from the start to the
weights written); "accuracies" and their "mean" on the test split; "time_to_90_s", the median
time at which the validation accuracy first reached 90 % (null if a run never did); "sps", the
epochs' training images per second of that wall time. Also the fp32 and bf16 bare-compute limits
at the fast profile's batch size ("limit_sps", benchmarks/train_speed.py's loop on tensors in
memory), what runs bfloat16 natively here ("cpu_bf16"), the CPU and the device. One JSON line:
{"default": {...}, "fast": {..., "params"}, "limit_sps": {"fp32", "bf16"}, "cpu_bf16", ...}.
Needs data/processed (`dvc repro preprocess`); writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import stages  # noqa: F401  (first: pins the portable numerics before torch loads)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accuracy import with_overrides  # noqa: E402
from train_speed import bare_compute, samples_per_second  # noqa: E402

from stages.config import PROCESSED_DIR, Params  # noqa: E402
from stages.dataset import load_dataset, make_loader  # noqa: E402
from stages.device import cpu_name, native_bf16, resolve_device  # noqa: E402
from stages.model import accuracy, load_model, test_loop  # noqa: E402
from stages.train import train  # noqa: E402

# The fast profile (docs/results.md "bf16 and the fast profile"): bf16 autocast, 4x the batch,
# and each pixel standardised, which lets the larger batch take a larger rate.
FAST_PROFILE = [
    "train.precision=bf16",
    "train.batch_size=512",
    "train.learning_rate=0.4",
    "train.input_scaling=per_pixel",
    "train.epochs=20",
]
TARGET = 0.90  # the validation accuracy "time to" measures


class EpochClock(logging.Handler):
    """The time since `start` at which the train stage logged each "epoch N/M" line."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()
        self.at: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "epoch %d/%d: %s":
            self.at[record.args[0]] = time.perf_counter() - self.start


def one_run(params: Params, out: Path, test_data: object, device: torch.device) -> dict:
    """Trains once into `out`; its wall time, test accuracy and time to TARGET on validation."""
    logger = logging.getLogger("stages.train")
    logger.setLevel(logging.INFO)  # the epoch lines the clock reads
    clock = EpochClock()
    logger.addHandler(clock)
    try:
        train.fn(params, PROCESSED_DIR, out / "w.pth", out / "live", out / "ck.pt")
        train_s = time.perf_counter() - clock.start
    finally:
        logger.removeHandler(clock)
    model = load_model(out / "w.pth", params.train, device)
    _, predictions = test_loop(make_loader(test_data, 1000, shuffle=False), model)
    curve = (out / "live" / "plots" / "metrics" / "val" / "accuracy.tsv").read_text().split("\n")
    reached = [
        int(row.split("\t")[0]) for row in curve[1:] if row and float(row.split("\t")[-1]) >= TARGET
    ]
    return {
        "train_s": train_s,
        "accuracy": accuracy(predictions, test_data.labels),
        "time_to_90_s": clock.at[reached[0]] if reached else None,
    }


def summary(runs: list[dict], params: Params, train_size: int) -> dict:
    train_s = statistics.median(run["train_s"] for run in runs)
    reached = [run["time_to_90_s"] for run in runs if run["time_to_90_s"] is not None]
    accuracies = [round(run["accuracy"], 4) for run in runs]
    return {
        "train_s": round(train_s, 1),
        "accuracies": accuracies,
        "mean": round(statistics.mean(accuracies), 4),
        "time_to_90_s": round(statistics.median(reached), 1) if len(reached) == len(runs) else None,
        "sps": round(params.train.epochs * train_size / train_s),
    }


def limits(batch_size: int, device: torch.device, samples: int = 30_000) -> dict[str, int]:
    """The MLP's forward, backward and SGD step on tensors in memory, in fp32 and in bf16."""
    bf16 = torch.autocast(device.type, torch.bfloat16)
    return {
        name: round(
            samples_per_second(
                bare_compute(batch_size, samples, device, autocast), batch_size, samples, device
            )
        )
        for name, autocast in (("fp32", None), ("bf16", bf16))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--fast-set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help=f"the fast profile's changes to params.yaml (default: {' '.join(FAST_PROFILE)})",
    )
    args = parser.parse_args()
    fast_set = args.fast_set or FAST_PROFILE
    kinds = {"default": with_overrides([]), "fast": with_overrides(fast_set)}
    device = resolve_device(kinds["default"].device)
    test_data = load_dataset(PROCESSED_DIR, "test", device)
    train_size = len(load_dataset(PROCESSED_DIR, "train", device))
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for kind, params in kinds.items():
                seeded = params.model_copy(update={"seed": seed})
                out = Path(tmp) / f"{kind}-{seed}"
                runs[kind].append(one_run(seeded, out, test_data, device))
    report: dict[str, object] = {
        kind: summary(runs[kind], kinds[kind], train_size) for kind in kinds
    }
    report["fast"]["params"] = fast_set
    report["fast_vs_default_train_s"] = round(
        report["fast"]["train_s"] / report["default"]["train_s"], 3
    )
    report["limit_sps"] = limits(kinds["fast"].train.batch_size, device)
    report.update(
        cpu_bf16=native_bf16(device) is not None,
        bf16_by=native_bf16(device),
        device=str(device),
        cpu=cpu_name(),
        seeds=args.seeds,
        torch=torch.__version__,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
