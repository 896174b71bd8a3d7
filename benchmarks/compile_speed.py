"""python benchmarks/compile_speed.py [--epochs 3] [--precision fp32 bf16]

Does `torch.compile` pay for the train stage? For each precision, the stage's loop (its loader,
the default params' model, optimizer and schedule, `stages.train.train_loop`) runs `--epochs`
epochs eagerly and then with the model compiled (inductor, a fresh cache: a first run's cost).
Reports, per precision: the eager epoch time (median), the compiled run's first epoch (compile
included) and later epochs (median), the compile cost (first compiled epoch minus a steady one),
and what a default-length run (params.yaml's train.epochs) would take each way. One JSON line.
Needs data/processed (`dvc repro preprocess`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

# isort: off
import stages  # noqa: F401  (first: pins the portable numerics before torch loads)

# isort: on
import torch
from torch import nn

from stages import numerics
from stages.config import PROCESSED_DIR, load_params
from stages.dataset import load_dataset, make_loader
from stages.device import configure_threads, cpu_name, resolve_device
from stages.model import build_model
from stages.train import make_optimizer, make_scheduler, seed_everything, train_loop


def epoch_times(compiled: bool, precision: str, epochs: int) -> list[float]:
    """Seconds per epoch of the stage's loop, eager or with the model compiled."""
    params = load_params()
    hp = params.train
    device = resolve_device(params.device)
    order = seed_everything(params.seed)
    loader = make_loader(
        load_dataset(PROCESSED_DIR, "train", device), hp.batch_size, shuffle=True, generator=order
    )
    model = build_model(hp).to(device)
    optimizer = make_optimizer(model, hp)
    scheduler = make_scheduler(optimizer, hp, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    trained: Callable = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else None
    numerics.configure_torch(bf16=precision == "bf16")  # oneDNN as the stage has it
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        train_loop(loader, trained, loss_fn, optimizer, scheduler, autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed each way (>= 2)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    params = load_params()
    threads = configure_threads(params.train.num_threads)
    default_epochs = params.train.epochs
    report: dict[str, object] = {}
    for precision in args.precision:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as on a fresh machine
            torch._dynamo.reset()
            eager = epoch_times(False, precision, args.epochs)
            compiled = epoch_times(True, precision, args.epochs)
            eager_s = statistics.median(eager)
            steady_s = statistics.median(compiled[1:])
            compile_s = compiled[0] - steady_s
            report[precision] = {
                "eager_epoch_s": round(eager_s, 3),
                "compiled_first_epoch_s": round(compiled[0], 2),
                "compiled_epoch_s": round(steady_s, 3),
                "compile_s": round(compile_s, 2),
                f"run_{default_epochs}_epochs_eager_s": round(default_epochs * eager_s, 1),
                f"run_{default_epochs}_epochs_compiled_s": round(
                    compile_s + default_epochs * steady_s, 1
                ),
            }
    report.update(
        device=str(resolve_device(params.device)),
        cpu=cpu_name(),
        threads=threads,
        batch_size=params.train.batch_size,
        torch=torch.__version__,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
