"""python benchmarks/train_speed.py [--samples 30000] [--rounds 3] [--device auto] [--numerics both]

Training throughput, three ways, in one process, on the same number of samples after a warm-up:
  (a) tutorial: torchvision FashionMNIST -> ToTensor -> DataLoader(shuffle=True), SGD lr 1e-3;
  (b) limit:    the same model's forward, backward and SGD step on random tensors in memory;
  (c) stage:    the train stage's own loop (stages.train.train_loop over the stage's loader),
                with the same SGD step, so c/b measures what the data path costs;
and (c') stage_default: the same loop with the default params' optimizer, schedule and
augmentation, for what a default run really does. (b) and (c) also run in bf16 (`limit_bf16`,
`stage_bf16`: under torch.autocast, as train.precision bf16 runs, with oneDNN on), with
`stage_vs_limit_bf16`; `cpu_bf16` says what runs bfloat16 natively here.
Runs at batch 64 and at the default batch size and prints one JSON line. The loops take turns,
round after round, and each reports its median: a slow spell on a shared machine then hits every
loop alike instead of skewing one ratio. Needs data/raw and data/processed
(`dvc repro preprocess`).

`--numerics both` (the default) measures with portable CPU numerics (stages/numerics.py) and with
this CPU's own, each round in a fresh process of each kind (the setting is read when torch
loads), and reports both, their ratio, and the CPU's name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import ToTensor

from stages import numerics
from stages.config import PROCESSED_DIR, RAW_DIR, load_params
from stages.dataset import load_dataset, make_loader
from stages.device import configure_threads, cpu_name, native_bf16, resolve_device
from stages.model import NeuralNetwork, build_model
from stages.train import make_augment, make_optimizer, make_scheduler, train_loop


def sgd_step_loop(
    batches: Iterable,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    autocast: torch.autocast | None = None,
) -> None:
    """The tutorial's loop body, as written there (under `autocast` for bf16)."""
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        with autocast or nullcontext():
            pred = model(x)
            loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def limited(loader: Iterable, batches: int) -> Iterable:
    """The first `batches` batches of `loader`, cycling through epochs if needed."""
    done = 0
    while True:
        for batch in loader:
            if done == batches:
                return
            yield batch
            done += 1


def samples_per_second(
    run: Callable[[int], None], batch_size: int, samples: int, device: torch.device
) -> float:
    """Times `run(batches)` for `samples` samples after a warm-up of 20 batches."""
    run(20)
    if device.type == "cuda":
        torch.cuda.synchronize()
    batches = max(1, samples // batch_size)
    start = time.perf_counter()
    run(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def with_onednn(run: Callable[[int], None]) -> Callable[[int], None]:
    """`run` with oneDNN on, as the train stage has it in bf16 (portable numerics turn it off;
    the fp32 MLP never uses it)."""

    def run_with_onednn(n: int) -> None:
        with torch.backends.mkldnn.flags(enabled=True):
            run(n)

    return run_with_onednn


def bare_compute(
    batch_size: int, samples: int, device: torch.device, autocast: torch.autocast | None = None
) -> Callable[[int], None]:
    """run(n): n SGD steps of the tutorial's model on random batches already on `device` (the
    limit: no data path at all); under `autocast` for bf16, with oneDNN on."""
    x_all = torch.randn(samples + 20 * batch_size, 1, 28, 28, device=device)
    y_all = torch.randint(0, 10, (x_all.shape[0],), device=device)
    model = NeuralNetwork().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run(n: int) -> None:
        parts = (slice(i * batch_size, (i + 1) * batch_size) for i in range(n))
        sgd_step_loop(((x_all[part], y_all[part]) for part in parts), model, optimizer, autocast)

    return run if autocast is None else with_onednn(run)


def measure(
    batch_size: int, samples: int, rounds: int, device: torch.device, tutorial_root: Path | None
) -> dict[str, float]:
    params = load_params()
    runs: dict[str, Callable[[int], None]] = {}
    torch.manual_seed(0)

    def fresh_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = NeuralNetwork().to(device)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3)

    if tutorial_root is not None:  # (a) only at batch 64, on the CPU as the tutorial runs it
        data = datasets.FashionMNIST(tutorial_root, train=True, download=True, transform=ToTensor())
        loader = DataLoader(data, batch_size=batch_size, shuffle=True)
        tutorial_model, tutorial_optimizer = fresh_sgd()

        def tutorial(n: int) -> None:
            batches = ((x.to(device), y.to(device)) for x, y in limited(loader, n))
            sgd_step_loop(batches, tutorial_model, tutorial_optimizer)

        runs["tutorial"] = tutorial

    # (b) no data path at all: batches are views of tensors already on the device.
    runs["limit"] = bare_compute(batch_size, samples, device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    runs["limit_bf16"] = bare_compute(batch_size, samples, device, bf16)

    # (c) the stage's data path and loop, same model and SGD step.
    train_data = load_dataset(PROCESSED_DIR, "train", device)
    stage_loader = make_loader(train_data, batch_size, shuffle=True, generator=torch.Generator())
    stage_model, stage_optimizer = fresh_sgd()
    loss_fn = nn.CrossEntropyLoss()
    runs["stage"] = lambda n: train_loop(
        limited(stage_loader, n), stage_model, loss_fn, stage_optimizer
    )
    # Under bf16 the stage stores the train images as autocast casts them (stages/train.py).
    bf16_data = load_dataset(PROCESSED_DIR, "train", device, dtype=torch.bfloat16)
    bf16_loader = make_loader(bf16_data, batch_size, shuffle=True, generator=torch.Generator())
    stage_bf16_model, stage_bf16_optimizer = fresh_sgd()
    runs["stage_bf16"] = with_onednn(
        lambda n: train_loop(
            limited(bf16_loader, n),
            stage_bf16_model,
            loss_fn,
            stage_bf16_optimizer,
            autocast=bf16,
        )
    )

    # (c') the same loop as the default params configure it.
    p = params.train
    default_data = load_dataset(PROCESSED_DIR, "train", device, make_augment(p, params.seed))
    default_loader = make_loader(
        default_data, batch_size, shuffle=True, generator=torch.Generator()
    )
    default_model = build_model(p).to(device)
    default_optimizer = make_optimizer(default_model, p)
    scheduler = make_scheduler(default_optimizer, p, len(default_loader))
    default_loss = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    runs["stage_default"] = lambda n: train_loop(
        limited(default_loader, n), default_model, default_loss, default_optimizer, scheduler
    )

    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            timings[name].append(samples_per_second(run, batch_size, samples, device))
    result = {f"{name}_sps": statistics.median(values) for name, values in timings.items()}

    result["stage_vs_limit"] = result["stage_sps"] / result["limit_sps"]
    result["stage_vs_limit_bf16"] = result["stage_bf16_sps"] / result["limit_bf16_sps"]
    if "tutorial_sps" in result:
        result["stage_vs_tutorial"] = result["stage_sps"] / result["tutorial_sps"]
    return {k: round(v, 3) if "_vs_" in k else round(v) for k, v in result.items()}


def one_round(mode: str, args: argparse.Namespace) -> dict:
    """One round with `mode` numerics, in a fresh process (numerics are fixed when torch loads)."""
    command = [sys.executable, __file__, "--numerics", mode, "--rounds", "1"]
    command += ["--samples", str(args.samples)] + (["--device", args.device] if args.device else [])
    # Set here, not by importing `stages`: this module imports torch first.
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE}
    env[numerics.SWITCH] = "1" if mode == "portable" else "0"
    if mode == "portable":
        env.update(numerics.PORTABLE)
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.splitlines()[-1])


def medians(reports: list[dict]) -> dict:
    """Each batch size's figures, the median over rounds; the rest as the first round says."""
    merged = dict(reports[0])
    for key, first in reports[0].items():
        if isinstance(first, dict) and all(isinstance(v, int | float) for v in first.values()):
            merged[key] = {
                name: round(statistics.median(r[key][name] for r in reports), 3 * ("_vs_" in name))
                for name in first
            }
    return merged


def compare_numerics(args: argparse.Namespace) -> dict:
    rounds: dict[str, list[dict]] = {"portable": [], "native": []}
    for _ in range(args.rounds):  # turns, so a slow spell hits both alike
        for mode, reports in rounds.items():
            reports.append(one_round(mode, args))
    report: dict[str, object] = {
        mode: {k: v for k, v in medians(reports).items() if k not in ("rounds", "samples", "cpu")}
        for mode, reports in rounds.items()
    }
    for batch, figures in report["portable"].items():
        if isinstance(figures, dict) and "stage_sps" in figures:
            native = report["native"][batch]["stage_sps"]
            report[f"{batch}_portable_vs_native_stage"] = round(figures["stage_sps"] / native, 3)
    report.update(cpu=cpu_name(), rounds=args.rounds, samples=args.samples)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=30_000, help="timed samples per loop")
    parser.add_argument("--rounds", type=int, default=3, help="turns each loop takes (median)")
    parser.add_argument("--device", default=None, help="default: params.yaml's device")
    parser.add_argument(
        "--numerics",
        choices=("both", "portable", "native"),
        default="both",
        help="portable CPU numerics, this CPU's own, or both compared (default)",
    )
    args = parser.parse_args()
    if args.numerics == "both":
        print(json.dumps(compare_numerics(args)))
        return
    numerics.configure_torch()  # oneDNN as the fp32 stage has it (the bf16 loops turn it on)
    if numerics.describe()["portable"] != (args.numerics == "portable"):
        sys.exit(f"--numerics {args.numerics}: not in effect here ({numerics.describe()})")
    params = load_params()
    device = resolve_device(args.device or params.device)
    threads = configure_threads(params.train.num_threads)
    default_batch = params.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"  # torchvision's layout; it md5-checks the files
        shutil.copytree(RAW_DIR, raw)
        report: dict[str, object] = {
            "batch_64": measure(64, args.samples, args.rounds, device, Path(tmp)),
            f"batch_{default_batch}": measure(
                default_batch, args.samples, args.rounds, device, None
            ),
        }
    report.update(device=str(device), threads=threads, samples=args.samples, rounds=args.rounds)
    report.update(numerics=numerics.describe(), cpu=cpu_name(), cpu_bf16=native_bf16(device))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
