"""python benchmarks/predict_speed.py [--model-dir models] [--runs 1000] [--rounds 5] [--threads 0]

Inference speed of the exported model under PyTorch (models/model_weights.pth) and under
onnxruntime (models/model.onnx), both loaded as `python -m stages.predict` loads them (each
checked against the model card), measured in one process:
  latency:    one image per call (batch 1), the 50th and 99th percentile over --runs calls per
              round and all rounds, in milliseconds;
  throughput: batches of 1000 images, images per second, the median over rounds.
The runtimes take turns, round after round, so a slow spell on a shared machine hits both alike.
Both run on the same number of CPU threads (--threads; 0: torch's default, one per physical
core), under the CPU numerics `stages` pins for every stage (stages/numerics.py). Inputs are
random normalised images: the time does not depend on the pixels. Prints one JSON line: the
figures, the CPU (lscpu's "Model name"), the thread counts and the versions. Needs the export
stage's outs (`dvc repro export`, or `dvc pull`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stages import numerics
from stages.device import cpu_name
from stages.predict import DEFAULT_MODEL_DIR, IMAGE_SIDE, Model, onnx_model, torch_model

Logits = Callable[[np.ndarray], np.ndarray]
WARM_UP_CALLS = 50
THROUGHPUT_BATCH = 1000
THROUGHPUT_BATCHES = 10  # per round


def inputs(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, IMAGE_SIDE, IMAGE_SIDE), "f4")


def latencies_ms(logits: Logits, image: np.ndarray, runs: int) -> list[float]:
    """The time of each of `runs` calls on one image, after a warm-up."""
    for _ in range(WARM_UP_CALLS):
        logits(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        logits(image)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def images_per_second(logits: Logits, batch: np.ndarray, batches: int) -> float:
    logits(batch)  # warm-up: the first call at a new size allocates
    start = time.perf_counter()
    for _ in range(batches):
        logits(batch)
    return batches * len(batch) / (time.perf_counter() - start)


def measure(
    runtimes: dict[str, Logits],
    runs: int,
    rounds: int,
    batch_size: int = THROUGHPUT_BATCH,
    batches: int = THROUGHPUT_BATCHES,
) -> dict[str, dict[str, float]]:
    """Each runtime's batch-1 latency percentiles and batched throughput, taking turns."""
    image, batch = inputs(1), inputs(batch_size, seed=1)
    latency: dict[str, list[float]] = {name: [] for name in runtimes}
    throughput: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, logits in runtimes.items():
            latency[name] += latencies_ms(logits, image, runs)
            throughput[name].append(images_per_second(logits, batch, batches))
    return {
        name: {
            "latency_ms_p50": round(float(np.percentile(latency[name], 50)), 4),
            "latency_ms_p99": round(float(np.percentile(latency[name], 99)), 4),
            f"throughput_ips_batch_{batch_size}": round(statistics.median(throughput[name])),
        }
        for name in runtimes
    }


def load(model_dir: Path, threads: int) -> tuple[dict[str, Model], int]:
    """Both runtimes on the same thread count; returns them and that count."""
    import torch

    by_torch = torch_model(model_dir, threads)
    threads = torch.get_num_threads()  # the default, when `threads` was 0
    return {"torch": by_torch, "onnxruntime": onnx_model(model_dir, threads)}, threads


def speedup(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """How many times faster onnxruntime is than torch, figure by figure."""
    ort, pt = figures["onnxruntime"], figures["torch"]
    return {
        key: round(pt[key] / ort[key] if key.startswith("latency") else ort[key] / pt[key], 2)
        for key in pt
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--runs", type=int, default=1000, help="batch-1 calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="turns each runtime takes")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    models, threads = load(args.model_dir, args.threads)
    figures = measure({name: m.logits for name, m in models.items()}, args.runs, args.rounds)
    report: dict[str, object] = {
        **figures,
        "onnxruntime_speedup": speedup(figures),
        "threads": {"torch": threads, "onnxruntime": threads},
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": {name: m.runtime for name, m in models.items()},
        "numerics": numerics.describe(),
        "model": models["onnxruntime"].card.get("model_name"),
        "runs": args.runs,
        "rounds": args.rounds,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
