"""Data-parallel training (`train.nproc_per_node` or `train.nnodes` > 1; docs/ddp.md).

The train stage, from either door (`python -m stages.train` or the flow's `train.fn(params)`),
calls `launch()`: it starts `python -m torch.distributed.run --standalone --nproc-per-node N
-m stages.distributed SPEC`, whose N workers each run the same `train.fn` with these params and
paths. With `train.nnodes` M > 1, the stage runs on M machines, and their launchers meet at the
rendezvous endpoint FMNIST_RDZV_ENDPOINT (HOST:PORT, torchrun's c10d rendezvous) instead of
`--standalone`. A worker knows itself by WORKER_ENV and torchrun's RANK, and takes its `Rank` from
`start()`: the process group (gloo on the CPU, NCCL on CUDA with one GPU per rank), its share of
each batch, and whether it writes.

Batch semantics: `train.batch_size` stays the global batch. Every rank draws the same seeded
permutation (and the same augmentation draws) as a single process, and takes its contiguous part
of each global batch; its loss is weighted by its share, so the gradients DDP averages are the
single-process gradient of the whole batch. The learning rate, schedule and step count therefore
keep their meaning: nothing to rescale. Each batch's loss is all-reduced before it is recorded,
so the curves and the non-finite check see every rank; validation is sharded the same way and
all-reduced. Every rank holds the same weights, so each machine's local rank 0 writes the
weights, record, curves and checkpoint into that machine's checkout, which then has its own
complete outs; the other ranks write theirs to a scratch folder that is deleted.

With `train.nproc_per_node: 1` and `train.nnodes: 1` (the defaults) nothing here runs but
`check_nproc`, which returns.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.device import Logger
from stages.errors import StageError

WORKER_ENV = "FMNIST_DDP_WORKER"  # set by launch() for the workers torchrun starts
SCRATCH_ENV = "FMNIST_DDP_SCRATCH"  # where ranks other than 0 write what rank 0 writes for real
RDZV_ENDPOINT_ENV = "FMNIST_RDZV_ENDPOINT"  # train.nnodes > 1: HOST:PORT, the same on every node
RDZV_ID_ENV = "FMNIST_RDZV_ID"  # the rendezvous (job) id, the same on every node
STOP_WAIT_S = 30.0  # after a stop signal, how long torchrun gets to stop its workers
# A collective that waits longer for a peer fails: a machine that died stops the others.
COLLECTIVE_TIMEOUT_S = 300


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1" and "RANK" in os.environ


def needed(nproc: int, nnodes: int) -> bool:
    """Whether the stage trains on torchrun's workers rather than in its own process."""
    return nproc > 1 or nnodes > 1


def rendezvous(nnodes: int) -> list[str]:
    """torchrun's arguments for where the launchers meet: this machine alone, or the endpoint."""
    if nnodes == 1:
        return ["--standalone"]
    endpoint = os.environ.get(RDZV_ENDPOINT_ENV, "").strip()
    if not endpoint:
        raise StageError(
            f"train.nnodes = {nnodes} needs the rendezvous endpoint: set "
            f"{RDZV_ENDPOINT_ENV}=HOST:PORT, the same on every machine (HOST is one of them)"
        )
    run_id = os.environ.get(RDZV_ID_ENV, "fashion-mnist-train")
    return [
        f"--nnodes={nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
    ]


def check_nproc(nproc: int, spec: str, device: torch.device) -> None:
    """Stops before any training if `nproc` workers cannot run on `device`."""
    if nproc == 1:
        return
    if device.type == "mps":
        raise StageError(
            f"train.nproc_per_node = {nproc}: data-parallel training runs on CPU (gloo) or "
            "CUDA (NCCL), not MPS; use 1, or device: cpu"
        )
    if device.type == "cuda":
        if spec.startswith("cuda:"):
            raise StageError(
                f"train.nproc_per_node = {nproc} with device = {spec!r}: the workers take one "
                "GPU each, cuda:0 to cuda:N-1; use device: cuda (or auto)"
            )
        count = torch.cuda.device_count()
        if nproc > count:
            raise StageError(
                f"train.nproc_per_node = {nproc}: more than the {count} CUDA GPU(s) on this "
                "machine (one GPU per worker)"
            )


def check_batches(train_size: int, batch_size: int, world: int) -> None:
    """Every global batch, the last one too, must give each rank at least one image."""
    last = train_size % batch_size or batch_size
    if min(batch_size, last) < world:
        raise StageError(
            f"{world} workers (train.nproc_per_node x train.nnodes): a batch of "
            f"{min(batch_size, last)} image(s) "
            f"(train.batch_size = {batch_size}, {train_size} train images) leaves a worker "
            "without any; use fewer workers or another batch size"
        )


def _set_parent_death_signal() -> None:  # in the torchrun child, before it runs
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def torchrun_command(nproc: int, nnodes: int, program: list[str]) -> list[str]:
    """`python -m torch.distributed.run ... PROGRAM`: `nproc` workers here, on one of `nnodes`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous(nnodes),
        "--nproc-per-node",
        str(nproc),
        "--monitor-interval",
        "0.5",
        *program,
    ]


def launch(params: Any, paths: dict[str, Path], logger: Logger) -> dict[str, float]:
    """Runs training on `train.nproc_per_node` workers (on each of `train.nnodes` machines);
    returns this machine's local rank 0's last epoch metrics."""
    nproc, nnodes = params.train.nproc_per_node, params.train.nnodes
    with tempfile.TemporaryDirectory(prefix="fmnist-ddp-") as tmp:
        folder = Path(tmp)
        spec = folder / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "params": params.model_dump(mode="json"),
                    "paths": {name: str(Path(path).absolute()) for name, path in paths.items()},
                }
            )
        )
        (folder / "scratch").mkdir()
        command = torchrun_command(nproc, nnodes, ["-m", "stages.distributed", str(spec)])
        env = {**os.environ, WORKER_ENV: "1", SCRATCH_ENV: str(folder / "scratch")}
        env.setdefault("OMP_NUM_THREADS", "1")  # each worker sets its own count (threads())
        logger.info("starting %d data-parallel workers here: %s", nproc, " ".join(command))
        linux = sys.platform.startswith("linux")
        process = subprocess.Popen(
            command, env=env, preexec_fn=_set_parent_death_signal if linux else None
        )
        try:
            code = process.wait()
        except BaseException:  # a stop signal: torchrun passes SIGTERM on to its workers
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
        errors = sorted(folder.glob("error-*.txt"))
        if errors:
            raise StageError(errors[0].read_text())
        if code != 0:
            raise StageError(
                f"data-parallel training failed: torchrun exited with code {code} "
                f"(train.nproc_per_node = {nproc}, train.nnodes = {nnodes}); the workers' output "
                "above says why"
            )
        return json.loads((folder / "metrics.json").read_text())


def with_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA, the CNN's BatchNorm layers normalise over the whole global batch, as in one
    process (SyncBatchNorm, in place: the same parameters and buffers). torch has no CPU
    SyncBatchNorm, so on the CPU each rank normalises over its own part of the batch."""
    if device.type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@dataclass
class Rank:
    """This worker's place: its rank among `world`, its device, and what it writes."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    scratch: Path

    @property
    def writes(self) -> bool:
        """Each machine's first worker writes that machine's outs."""
        return self.local_rank == 0

    def part(self, count: int) -> slice:
        """This rank's contiguous part of `count` items (torch.tensor_split's division)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def outs(self, weights_path: Path, live_dir: Path) -> tuple[Path, Path]:
        """Where this rank writes the weights and curves: scratch, but on rank 0."""
        if self.writes:
            return weights_path, live_dir
        return self.scratch / Path(weights_path).name, self.scratch / "live"

    def check_batches(self, train_size: int, batch_size: int) -> None:
        check_batches(train_size, batch_size, self.world)

    def threads(self, num_threads: int) -> int:
        """`train.num_threads` per worker; 0 shares the physical cores among this node's ranks."""
        if num_threads:
            return num_threads
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        return max(1, cores // self.local_world)

    def require_same_start(self, epoch: int, batch: int) -> None:
        """Every rank must start where the others do: each machine resumes from its own
        checkpoint, and a machine killed at another moment may hold an older one."""
        here = torch.tensor([epoch, batch], dtype=torch.int64, device=self.device)
        low, high = here.clone(), here.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise StageError(
                f"the workers would start from different checkpoints (epoch {epoch}, batch "
                f"{batch} here; epochs {low[0].item()} to {high[0].item()} across them): delete "
                "models/checkpoints/train.pt on every machine, then run train again"
            )

    def shared_device(self) -> torch.device:
        """The device as the checkpoint fingerprint names it: the same on every rank."""
        return torch.device(self.device.type)

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(with_sync_batchnorm(model, self.device), device_ids=ids)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor

    def train_loop(
        self,
        dataloader: Iterable,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        record: Any,
        after_batch: Callable[[Any], None] | None = None,
        autocast: torch.autocast | None = None,
    ) -> Any:
        """stages.train.train_loop on this rank's part of each global batch. The loss is weighted
        by the part's share, so DDP's average is the whole batch's gradient; the batch's loss
        over every rank is recorded."""
        model.train()
        for x, y in dataloader:
            total = y.shape[0]
            part = self.part(total)
            x, y = x[part], y[part]
            record.lrs.append(optimizer.param_groups[0]["lr"])
            with autocast or nullcontext():
                loss = loss_fn(model(x), y)
            (loss * (y.shape[0] * self.world / total)).backward()
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
            record.losses.append(self.all_sum(loss.detach() * (y.shape[0] / total)))
            record.sizes.append(total)
            if after_batch is not None:
                after_batch(record)
        return record

    def epoch_metrics(
        self, model: nn.Module, val_loader: Any, record: Any, label_smoothing: float
    ) -> dict[str, float]:
        """stages.train.epoch_metrics, each rank on its part of the validation split, summed."""
        val_data, batch_size = val_loader.dataset, val_loader.batch_sampler.batch_size
        model.eval()
        part = self.part(len(val_data))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # CE, objective, right, n
        with torch.no_grad():
            for indices in torch.arange(part.start, part.stop).split(batch_size):
                x, y = val_data.__getitems__(indices)
                logits = model(x)
                for slot, smoothing in enumerate((0.0, label_smoothing)):
                    sums[slot] += nn.functional.cross_entropy(
                        logits, y, reduction="sum", label_smoothing=smoothing
                    ).double()
                sums[2] += (logits.argmax(dim=1) == y).sum()
                sums[3] += y.shape[0]
        loss, objective, right, count = self.all_sum(sums).tolist()
        return {
            "train/loss": record.mean_loss(),
            "val/loss_train_objective": objective / count,
            "val/loss": loss / count,
            "val/accuracy": right / count,
        }


def start(device: torch.device, logger: Logger) -> Rank:
    """Joins torchrun's process group: gloo on the CPU, NCCL on CUDA (the GPU of the local rank)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
    logger.info("data-parallel rank %d of %d (%s, %s)", rank, world, backend, device)
    scratch = Path(os.environ.get(SCRATCH_ENV) or tempfile.mkdtemp()) / f"rank{rank}"
    return Rank(rank, world, local_rank, local_world, device, scratch)


def main(argv: list[str]) -> int:
    """A torchrun worker: `python -m stages.distributed SPEC` (launch() writes SPEC)."""
    from stages.config import parse_params
    from stages.signals import StageStopped, stop_on_signals
    from stages.train import train

    stop_on_signals()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stages").setLevel(logging.INFO)
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    try:
        metrics = train.fn(
            parse_params(spec["params"]),
            **{name: Path(path) for name, path in spec["paths"].items()},
        )
    except StageError as exc:
        (spec_path.parent / f"error-{rank}.txt").write_text(str(exc))
        print(f"error: train (rank {rank}): {exc}", file=sys.stderr)
        return 1
    except StageStopped as stop:
        return 128 + stop.signum
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if local_rank == 0:
        (spec_path.parent / "metrics.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
