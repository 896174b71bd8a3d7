"""python -m stages.train

Trains the tutorial's NeuralNetwork (or, with train.model: cnn, a small CNN) on
data/processed/train.pt, normalised with data/processed/stats.json, checking accuracy on
data/processed/val.pt after each epoch (in batches of evaluate.batch_size). The network and its
initial weights, the optimizer, schedule, batch size, epochs, loss settings, augmentation, seed
and device come from params.yaml (the train section). Writes the state_dict to
models/train/model_weights.pth, with models/train/record.json beside it (the params, data
sha256, code digest and device it was made with), and the per-epoch curves with dvclive to
reports/train/, one row per epoch numbered from 1: train/loss (the training objective, label
smoothing included, averaged over the epoch's batches), val/loss_train_objective (the same
objective on the validation split after the epoch), val/loss (plain cross-entropy) and
val/accuracy. It checkpoints to models/checkpoints/train.pt after each epoch (and every
train.checkpoint_every_steps batches); a rerun with the same params, data and code resumes from
there, and a finished run deletes it. With train.nproc_per_node > 1 it trains on that many
data-parallel workers started with torchrun, rank 0 writing (stages/distributed.py, docs/ddp.md).
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("train", __doc__)

import random
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from prefect import task
from prefect.cache_policies import NONE
from scmrepo.exceptions import SCMError
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages import distributed, numerics
from stages.artifacts import (
    atomic_dir,
    atomic_paths,
    file_digest,
    json_text,
    require_writable,
    source_digest,
    torch_save,
)
from stages.checkpoint import (
    fingerprints,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_state,
)
from stages.config import (
    CHECKPOINT,
    LIVE_DIR,
    PROCESSED_DIR,
    TRAINED_WEIGHTS,
    Params,
    TrainParams,
)
from stages.dataset import IndexBatchSampler, ShiftFlip, load_dataset, make_loader, pixel_stats
from stages.device import (
    Logger,
    configure_determinism,
    configure_threads,
    native_bf16,
    resolve_device,
)
from stages.errors import StageError
from stages.fashion_mnist import STATS_FILE, load_split, load_stats
from stages.model import accuracy, build_model, fold_input_normalization, test_losses
from stages.records import RECORD_FILE, make_record, read_record, recorded_outputs
from stages.runtime import run_cli, stage_logger


def seed_everything(seed: int) -> torch.Generator:
    """Seeds every RNG the stage touches; returns the generator that orders the batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: nn.Module, hp: TrainParams) -> torch.optim.Optimizer:
    """The optimizer; under bf16 on a CPU or GPU its fused kernel (one pass over each tensor,
    faster: docs/results.md), whose rounding may differ between CPUs, as bf16's already does.
    fp32 keeps the default kernel, which holds the portable bytes."""
    device = next(model.parameters()).device
    fused = hp.precision == "bf16" and device.type in ("cpu", "cuda")
    options = {"weight_decay": hp.weight_decay, "fused": fused or None}
    if hp.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), hp.learning_rate, hp.momentum, **options)
    optimizer_class = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(model.parameters(), lr=hp.learning_rate, **options)


def make_augment(hp: TrainParams, seed: int) -> ShiftFlip | None:
    """The training augmentation the params ask for, drawing from its own seeded generator."""
    if not (hp.shift_pixels or hp.hflip):
        return None
    return ShiftFlip(hp.shift_pixels, hp.hflip, torch.Generator().manual_seed(seed + 1))


# How far one-cycle lowers SGD's momentum while the rate peaks (PyTorch's 0.95 -> 0.85).
MOMENTUM_DIP = 0.1


def make_scheduler(
    optimizer: torch.optim.Optimizer, hp: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per batch; learning_rate is the peak (onecycle) or starting (cosine) rate.

    One-cycle also cycles SGD's momentum against the rate: `momentum` at the lowest rates,
    `momentum - 0.1` at the peak (PyTorch's default cycle, 0.95 to 0.85, ignores the param).
    """
    total = hp.epochs * steps_per_epoch
    if hp.scheduler == "onecycle":
        momentum = {}
        if hp.optimizer == "sgd":
            momentum = {
                "cycle_momentum": hp.momentum > 0,
                "max_momentum": hp.momentum,
                "base_momentum": max(0.0, round(hp.momentum - MOMENTUM_DIP, 6)),
            }
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, hp.learning_rate, total_steps=total, **momentum
        )
    if hp.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


# Batches between checks for a non-finite loss: divergence stops training within this many.
FINITE_CHECK_EVERY = 32


@dataclass
class EpochRecord:
    """One epoch's batch losses (left on the device: no sync per batch) and learning rates."""

    losses: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def mean_loss(self) -> float:
        sizes = torch.tensor(self.sizes, dtype=torch.float32, device=self.losses[0].device)
        return ((torch.stack(self.losses) * sizes).sum() / sizes.sum()).item()

    def first_non_finite(self, start: int = 0) -> int | None:
        bad = (~torch.isfinite(torch.stack(self.losses[start:]))).nonzero()
        return start + int(bad[0]) if len(bad) else None

    def to_state(self) -> dict[str, Any]:
        losses = torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)
        return {"losses": losses, "sizes": self.sizes, "lrs": self.lrs}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochRecord:
        return cls(list(state["losses"].to(device).unbind()), state["sizes"], state["lrs"])


def train_loop(
    dataloader: Iterable,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    record: EpochRecord | None = None,
    after_batch: Callable[[EpochRecord], None] | None = None,
    autocast: torch.autocast | None = None,
) -> EpochRecord:
    """The tutorial's train loop over one epoch's batches, adding each batch to `record`; with
    `autocast` (train.precision bf16), the forward pass and the loss run under it."""
    record = EpochRecord() if record is None else record
    model.train()
    for x, y in dataloader:
        record.lrs.append(optimizer.param_groups[0]["lr"])
        with autocast or nullcontext():
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        record.losses.append(loss.detach())
        record.sizes.append(y.shape[0])
        if after_batch is not None:
            after_batch(record)
    return record


@dataclass
class Progress:
    """Where training stands: the epoch in progress, the batch-order generator state it started
    from, its batches so far, and every finished epoch's metrics."""

    epoch: int
    order: torch.Tensor
    record: EpochRecord = field(default_factory=EpochRecord)
    history: list[dict[str, float]] = field(default_factory=list)

    def finish_epoch(self, metrics: dict[str, float], next_order: torch.Tensor) -> None:
        """Records the epoch's metrics; the next epoch's batch order starts from `next_order`."""
        self.history.append(metrics)
        self.epoch += 1
        self.order = next_order
        self.record = EpochRecord()

    def to_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "order": self.order,
            "record": self.record.to_state(),
            "history": self.history,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Progress:
        record = EpochRecord.from_state(state["record"], device)
        return cls(state["epoch"], state["order"], record, state["history"])


def require_finite(
    record: EpochRecord, epoch: int, steps_per_epoch: int, hp: TrainParams, start: int = 0
) -> None:
    batch = record.first_non_finite(start)
    if batch is None:
        return
    step = (epoch - 1) * steps_per_epoch + batch + 1
    raise StageError(
        f"training diverged: loss {record.losses[batch].item()} at epoch {epoch}, step {step} "
        f"(batch {batch + 1} of {steps_per_epoch}), learning rate {record.lrs[batch]:g} "
        f"(train.learning_rate = {hp.learning_rate}); lower train.learning_rate"
    )


@dataclass
class Checkpoints:
    """Saves, and resumes from, everything an interrupted run needs to finish as if it had not
    stopped: the progress, the model, optimizer and scheduler, and every RNG state."""

    path: Path
    fingerprints: dict[str, str]  # the params, data and code a checkpoint must match
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generators: dict[str, torch.Generator | None]
    device: torch.device
    write: bool  # False on data-parallel ranks other than 0: they resume, never save

    def save(self, progress: Progress) -> None:
        if not self.write:
            return
        trained = training_state(
            self.model, self.optimizer, self.scheduler, self.generators, self.device
        )
        save_checkpoint(self.path, self.fingerprints, {**progress.to_state(), **trained})

    def resume(self, logger: Logger, steps_per_epoch: int) -> Progress | None:
        """The saved progress, with every state restored; None without a matching checkpoint."""
        state = load_checkpoint(self.path, self.fingerprints, logger)
        if state is None:
            return None
        restore_training(
            state, self.model, self.optimizer, self.scheduler, self.generators, self.device
        )
        progress = Progress.from_state(state, self.device)
        logger.info(
            "resuming from %s: epoch %d, batch %d of %d",
            self.path,
            progress.epoch,
            len(progress.record.losses),
            steps_per_epoch,
        )
        return progress


@dataclass
class AfterBatch:
    """What train_loop runs after each batch: the non-finite-loss check every
    FINITE_CHECK_EVERY batches, and a checkpoint every `train.checkpoint_every_steps` steps."""

    progress: Progress
    checkpoints: Checkpoints
    steps_per_epoch: int
    hp: TrainParams

    def __call__(self, record: EpochRecord) -> None:
        epoch, done = self.progress.epoch, len(record.losses)
        if done % FINITE_CHECK_EVERY == 0:  # a device sync every few batches, not every batch
            start = done - FINITE_CHECK_EVERY
            require_finite(record, epoch, self.steps_per_epoch, self.hp, start)
        step = (epoch - 1) * self.steps_per_epoch + done
        if self.hp.checkpoint_every_steps and step % self.hp.checkpoint_every_steps == 0:
            require_finite(record, epoch, self.steps_per_epoch, self.hp)  # never save divergence
            self.checkpoints.save(self.progress)


def epoch_metrics(
    model: nn.Module, val_loader: DataLoader, record: EpochRecord, label_smoothing: float
) -> dict[str, float]:
    """The epoch's metrics: the mean train loss over its batches; on the validation split, after
    the epoch, the loss under the same objective (the train label smoothing), the plain
    cross-entropy and the accuracy, all from one pass."""
    (val_loss, val_objective_loss), predictions = test_losses(
        val_loader, model, [0.0, label_smoothing]
    )
    return {
        "train/loss": record.mean_loss(),
        "val/loss_train_objective": val_objective_loss,
        "val/loss": val_loss,
        "val/accuracy": accuracy(predictions, val_loader.dataset.labels),
    }


@dataclass
class OneProcess:
    """Training in this process alone: the tutorial's loop, and this process writes every out.
    stages.distributed.Rank has the same methods for one of `train.nproc_per_node` workers."""

    device: torch.device
    writes: bool = True

    def threads(self, num_threads: int) -> int:
        return num_threads

    def require_same_start(self, epoch: int, batch: int) -> None:
        return None

    def shared_device(self) -> torch.device:
        return self.device

    def outs(self, weights_path: Path, live_dir: Path) -> tuple[Path, Path]:
        return weights_path, live_dir

    def check_batches(self, train_size: int, batch_size: int) -> None:
        return None

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def train_loop(self, *args: Any) -> EpochRecord:
        return train_loop(*args)

    def epoch_metrics(
        self, model: nn.Module, val_loader: DataLoader, record: EpochRecord, smoothing: float
    ) -> dict[str, float]:
        return epoch_metrics(model, val_loader, record, smoothing)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def open_live(live_dir: Path) -> Live:
    try:
        return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False)
    except SCMError as exc:  # dvclive reads the git revision and fails in a repo with no commit
        raise StageError(f"dvclive needs a git repository with a commit here: {exc}") from None


def log_epoch(live: Live | None, epoch: int, metrics: dict[str, float]) -> None:
    """One row per curve, numbered by epoch from 1 (dvclive's `step`). A data-parallel rank that
    writes no outs has no Live (None): dvclive's end-of-run cleanup of its signal file in
    .dvc/tmp races between processes of one checkout, and fails the loser."""
    if live is None:
        return
    live.step = epoch
    for name, value in metrics.items():
        live.log_metric(name, round(value, 6))
    live.next_step()


def make_loaders(
    processed_dir: Path,
    params: Params,
    device: torch.device,
    order_generator: torch.Generator,
    augment: ShiftFlip | None,
) -> tuple[DataLoader, DataLoader]:
    """The train loader (shuffled by `order_generator`, augmented) and the validation loader.
    Under bf16 the train images are stored as autocast would cast them (the same values). Under
    `train.input_scaling: per_pixel` both splits are normalised with the train split's per-pixel
    stats, which the datasets keep (`.mean`, `.std`) for folding into the saved weights."""
    hp = params.train
    stats = None  # stats.json's
    if hp.input_scaling == "per_pixel":
        stats = pixel_stats(load_split(processed_dir, "train")[0])
    dtype = torch.bfloat16 if hp.precision == "bf16" else torch.float32
    train_data = load_dataset(processed_dir, "train", device, augment, dtype, stats)
    val_data = load_dataset(processed_dir, "val", device, stats=stats)
    batch_size = params.train.batch_size
    if batch_size > len(train_data):
        raise StageError(
            f"train.batch_size = {batch_size}: larger than the train split ({len(train_data)})"
        )
    return (
        make_loader(train_data, batch_size, shuffle=True, generator=order_generator),
        make_loader(val_data, params.evaluate.batch_size, shuffle=False),
    )


def processed_inputs(processed_dir: Path) -> dict[str, str]:
    """sha256 of each processed file training reads, checked against preprocess's record."""
    files = [Path(processed_dir) / name for name in ("train.pt", "val.pt", STATS_FILE)]
    return recorded_outputs(Path(processed_dir) / RECORD_FILE, "preprocess", *files)


def mixed_precision(precision: str, device: torch.device, logger: Logger) -> torch.autocast | None:
    """`train.precision: bf16`: torch.autocast in bfloat16 for the forward pass and the loss,
    the weights and optimizer state staying fp32; None for fp32."""
    if precision == "fp32":
        return None
    native = native_bf16(device)
    if native is None:
        logger.warning(
            "train.precision = 'bf16' on %s without native bfloat16 (no AMX or AVX512-BF16 on a "
            "CPU): expect it slower than fp32",
            device,
        )
    else:
        logger.info("bf16 autocast on %s: native bfloat16 (%s)", device.type, native)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def log_numerics(device: torch.device, logger: Logger) -> None:
    described = numerics.describe()
    if described["portable"]:
        logger.info(
            "CPU numerics: portable (%s): the same bytes on any x86-64 CPU with AVX2",
            {k: v for k, v in described.items() if k != "portable"},
        )
    else:
        logger.info(
            "CPU numerics: this CPU's own (%s)", described.get("why_not", f"{numerics.SWITCH}=0")
        )
    if device.type != "cpu":
        logger.info("portable numerics cover the CPU only; on %s, train.deterministic", device.type)


def train_record(
    params: Params,
    processed_dir: Path,
    data_digests: dict[str, str],
    made: dict[str, str],
    device: torch.device,
    num_threads: int,
) -> dict[str, Any]:
    """What these weights were made from: evaluate and export read it, not params.yaml."""
    mean, std = load_stats(processed_dir)
    used = {
        "seed": params.seed,
        "device": params.device,
        "train": params.train.model_dump(mode="json"),
        "evaluate": params.evaluate.model_dump(mode="json"),
    }
    return make_record(
        "train",
        used,
        data_digests,
        made,
        preprocess=read_record(Path(processed_dir) / RECORD_FILE, "preprocess"),
        normalize={"mean": mean, "std": std},
        code={"stages_sha256": source_digest(), "torch": torch.__version__},
        ran_on={"device": str(device), "threads": num_threads, "numerics": numerics.describe()},
    )


@task(name="train", cache_policy=NONE, persist_result=False)
def train(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    weights_path: Path = TRAINED_WEIGHTS,
    live_dir: Path = LIVE_DIR,
    checkpoint_path: Path = CHECKPOINT,
) -> dict[str, float]:
    logger = stage_logger("train")
    hp = params.train
    configure_determinism(hp.deterministic, logger)
    device = resolve_device(params.device, logger)
    distributed.check_nproc(hp.nproc_per_node, params.device, device)
    if distributed.needed(hp.nproc_per_node, hp.nnodes) and not distributed.is_worker():
        # torchrun's workers each run this function
        paths = {
            "processed_dir": processed_dir,
            "weights_path": weights_path,
            "live_dir": live_dir,
            "checkpoint_path": checkpoint_path,
        }
        return distributed.launch(params, paths, logger)
    rank = distributed.start(device, logger) if distributed.is_worker() else OneProcess(device)
    device = rank.device
    weights_path, live_dir = rank.outs(weights_path, live_dir)  # rank 0 alone writes the outs
    num_threads = configure_threads(rank.threads(hp.num_threads), logger)
    numerics.configure_torch(bf16=hp.precision == "bf16")
    log_numerics(device, logger)
    autocast = mixed_precision(hp.precision, device, logger)
    record_path = Path(weights_path).with_name(RECORD_FILE)
    require_writable(weights_path, record_path, checkpoint_path, files=True)  # folders refused
    require_writable(live_dir)
    order_generator = seed_everything(params.seed)
    augment = make_augment(hp, params.seed)
    train_loader, val_loader = make_loaders(processed_dir, params, device, order_generator, augment)
    steps_per_epoch = len(train_loader)
    rank.check_batches(len(train_loader.dataset), hp.batch_size)
    sampler = train_loader.batch_sampler
    assert isinstance(sampler, IndexBatchSampler)  # it skips a resumed epoch's done batches

    model = build_model(hp).to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    optimizer = make_optimizer(model, hp)
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch)
    generators = {"order": order_generator, "augment": augment.generator if augment else None}
    data_digests = processed_inputs(processed_dir)
    matching = fingerprints(params, rank.shared_device(), num_threads, data_digests)
    checkpoints = Checkpoints(
        checkpoint_path, matching, model, optimizer, scheduler, generators, device, rank.writes
    )
    progress = checkpoints.resume(logger, steps_per_epoch) or Progress(
        epoch=1, order=order_generator.get_state()
    )
    rank.require_same_start(progress.epoch, len(progress.record.losses))
    after_batch = AfterBatch(progress, checkpoints, steps_per_epoch, hp)
    trained = rank.wrap(model)  # data-parallel: the DDP-wrapped model

    logger.info(
        "training %d epochs on %d images, batch %d, %s lr %g",
        hp.epochs,
        len(train_loader.dataset),
        hp.batch_size,
        hp.optimizer,
        hp.learning_rate,
    )
    # The weights, their record and the curves are replaced together, once training has finished.
    with (
        atomic_paths(weights_path, record_path) as (weights_staging, record_staging),
        atomic_dir(live_dir) as live_staging,
        open_live(live_staging) if rank.writes else nullcontext() as live,
        tqdm(
            total=hp.epochs,
            initial=progress.epoch - 1,
            desc="train",
            unit="epoch",
            disable=not rank.writes,  # one bar, rank 0's
        ) as bar,
    ):
        for epoch, metrics in enumerate(progress.history, start=1):  # a resumed run's epochs
            log_epoch(live, epoch, metrics)
        for epoch in range(progress.epoch, hp.epochs + 1):
            # The epoch's batch order from its start; a resumed epoch skips the batches it did.
            order_generator.set_state(progress.order)
            sampler.skip = len(progress.record.losses)
            rank.train_loop(
                train_loader,
                trained,
                loss_fn,
                optimizer,
                scheduler,
                progress.record,
                after_batch,
                autocast,
            )
            require_finite(progress.record, epoch, steps_per_epoch, hp)
            metrics = rank.epoch_metrics(model, val_loader, progress.record, hp.label_smoothing)
            log_epoch(live, epoch, metrics)
            bar.update()
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}", val_acc=f"{metrics['val/accuracy']:.4f}"
            )
            logger.info("epoch %d/%d: %s", epoch, hp.epochs, format_metrics(metrics))
            progress.finish_epoch(metrics, next_order=order_generator.get_state())
            checkpoints.save(progress)
        weights = cpu_state_dict(model)
        if hp.input_scaling == "per_pixel":  # the saved weights take stats.json's inputs
            dataset = train_loader.dataset
            stats = load_stats(processed_dir)
            weights = fold_input_normalization(weights, (dataset.mean, dataset.std), stats)
        torch_save(weights, weights_staging)
        made = {Path(weights_path).name: file_digest(weights_staging, "sha256")}
        record = train_record(params, processed_dir, data_digests, made, device, num_threads)
        record_staging.write_text(json_text(record))
    if rank.writes:
        Path(checkpoint_path).unlink(missing_ok=True)
    logger.info("wrote %s", weights_path)
    return progress.history[-1]


def main(argv: list[str] | None = None) -> int:
    return run_cli(train, parse_args("train", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(train, ARGS))
