"""python benchmarks/ddp_speed.py [--nprocs 1 2] [--samples 20000] [--rounds 3]

Data-parallel training throughput (docs/ddp.md) on the CPU: the train stage's loop at the default
params (global batch train.batch_size, its optimizer and schedule) on data/processed/train.pt,
in one process (stages.train.train_loop) and in N gloo workers started by torchrun
(stages.distributed.Rank.train_loop on the DDP-wrapped model). Each count is timed for
`--samples` samples after a warm-up of 10 batches, `--rounds` times, each a fresh launch; the
median samples/s is reported, with and without the start-up (process start, imports, process
group, data load), which torchrun adds on every run. Threads: train.num_threads 0, that is the
physical cores shared among the workers. Prints one JSON line. Needs data/processed
(`dvc repro preprocess`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import stages  # noqa: E402,F401  (pins the numerics before torch loads)
from stages import distributed  # noqa: E402
from stages.device import cpu_name  # noqa: E402


def measure(samples: int, threads: int) -> dict[str, float]:
    """Samples/s of the stage's loop in this process: alone, or as one torchrun worker."""
    import logging

    import torch
    from torch import nn

    from stages.config import PROCESSED_DIR, load_params
    from stages.device import configure_threads
    from stages.model import build_model
    from stages.train import (
        EpochRecord,
        make_loaders,
        make_optimizer,
        make_scheduler,
        seed_everything,
        train_loop,
    )

    logger = logging.getLogger("ddp_speed")
    params = load_params(REPO / "params.yaml")
    hp = params.train.model_copy(update={"num_threads": threads})
    device = torch.device("cpu")
    ddp = distributed.start(device, logger) if distributed.is_worker() else None
    used = configure_threads(hp.num_threads if ddp is None else ddp.threads(hp.num_threads), logger)
    order = seed_everything(params.seed)
    loader, _ = make_loaders(REPO / PROCESSED_DIR, params, device, order, None)
    model = build_model(hp)
    optimizer = make_optimizer(model, hp)
    scheduler = make_scheduler(optimizer, hp, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    loop, trained = (train_loop, model) if ddp is None else (ddp.train_loop, ddp.wrap(model))

    def run(batches: int) -> None:
        done = 0
        while done < batches:
            for x, y in loader:
                if done == batches:
                    return
                loop([(x, y)], trained, loss_fn, optimizer, scheduler, EpochRecord())
                done += 1

    run(10)
    batches = max(1, samples // hp.batch_size)
    if ddp is not None:
        torch.distributed.barrier()
    start = time.perf_counter()
    run(batches)
    if ddp is not None:
        torch.distributed.barrier()
    seconds = time.perf_counter() - start
    per_s = batches * hp.batch_size / seconds
    return {"samples_per_s": per_s, "rank": ddp.rank if ddp else 0, "threads": used}


def launch(nproc: int, samples: int, threads: int) -> dict[str, float]:
    """One fresh run at `nproc` processes: the loop's samples/s, and the whole run's wall time."""
    start = time.perf_counter()
    program = [__file__, "--worker", "--samples", str(samples), "--threads", str(threads)]
    if nproc == 1:
        command = [sys.executable, *program]
    else:
        command = distributed.torchrun_command(nproc, 1, program)
    env = {**os.environ, distributed.WORKER_ENV: "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    result = next(json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
    return {"loop": result["samples_per_s"], "wall_s": wall, "threads": result["threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="train.num_threads per worker to try (0: physical cores / workers)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args.samples, args.threads[0])
        if result["rank"] == 0:
            print(json.dumps(result), flush=True)
        return
    kinds = [(n, t) for n in args.nprocs for t in args.threads]
    runs: dict[tuple[int, int], list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):  # taking turns: a slow spell hits every kind alike
        for n, t in kinds:
            runs[n, t].append(launch(n, args.samples, t))
    report = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "samples": args.samples,
        "rounds": args.rounds,
    }
    for (n, _t), results in runs.items():
        report[f"nproc_{n}_threads_{results[0]['threads']}"] = {
            "loop_samples_per_s": round(statistics.median(r["loop"] for r in results), 1),
            "wall_s": round(statistics.median(r["wall_s"] for r in results), 2),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
