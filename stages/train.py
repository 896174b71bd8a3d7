"""python -m stages.train

Trains the tutorial's NeuralNetwork (or, with train.model: cnn, a small CNN) on
data/processed/train.pt, normalised with data/processed/stats.json, checking accuracy on
data/processed/val.pt after each epoch (in batches of evaluate.batch_size). The network and its
initial weights, the optimizer, schedule, batch size, epochs, loss settings, augmentation, seed
and device come from params.yaml (the train section). Writes the
state_dict to models/train/model_weights.pth and the per-epoch curves (train loss, val loss, val
accuracy) with dvclive to reports/train/. It checkpoints to models/checkpoints/train.pt after
each epoch (and every train.checkpoint_every_steps batches); a rerun with the same params, data
and code resumes from there, and a finished run deletes it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
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
from tqdm import tqdm

from stages.artifacts import atomic_dir, atomic_path, require_writable, torch_save
from stages.checkpoint import (
    fingerprints,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_state,
)
from stages.config import CHECKPOINT, LIVE_DIR, PROCESSED_DIR, TRAINED_WEIGHTS, Params, TrainParams
from stages.dataset import IndexBatchSampler, ShiftFlip, load_dataset, make_loader
from stages.device import configure_determinism, configure_threads, resolve_device
from stages.errors import StageError
from stages.model import accuracy, build_model, test_loop
from stages.runtime import run_cli, stage_logger


def seed_everything(seed: int) -> torch.Generator:
    """Seeds every RNG the stage touches; returns the generator that orders the batches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    if p.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=p.learning_rate, momentum=p.momentum, weight_decay=p.weight_decay
        )
    optimizer_class = torch.optim.Adam if p.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(model.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)


def make_augment(p: TrainParams, seed: int) -> ShiftFlip | None:
    """The training augmentation the params ask for, drawing from its own seeded generator."""
    if not (p.shift_pixels or p.hflip):
        return None
    return ShiftFlip(p.shift_pixels, p.hflip, torch.Generator().manual_seed(seed + 1))


# How far one-cycle lowers SGD's momentum while the rate peaks (PyTorch's 0.95 -> 0.85).
MOMENTUM_DIP = 0.1


def make_scheduler(
    optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per batch; learning_rate is the peak (onecycle) or starting (cosine) rate.

    One-cycle also cycles SGD's momentum against the rate: `momentum` at the lowest rates,
    `momentum - 0.1` at the peak (PyTorch's default cycle, 0.95 to 0.85, ignores the param).
    """
    total = p.epochs * steps_per_epoch
    if p.scheduler == "onecycle":
        momentum = {}
        if p.optimizer == "sgd":
            momentum = {
                "cycle_momentum": p.momentum > 0,
                "max_momentum": p.momentum,
                "base_momentum": max(0.0, round(p.momentum - MOMENTUM_DIP, 6)),
            }
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, p.learning_rate, total_steps=total, **momentum
        )
    if p.scheduler == "cosine":
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
) -> EpochRecord:
    """The tutorial's train loop over one epoch's batches, adding each batch to `record`."""
    record = EpochRecord() if record is None else record
    model.train()
    for x, y in dataloader:
        record.lrs.append(optimizer.param_groups[0]["lr"])
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
    record: EpochRecord, epoch: int, steps_per_epoch: int, p: TrainParams, start: int = 0
) -> None:
    batch = record.first_non_finite(start)
    if batch is None:
        return
    step = (epoch - 1) * steps_per_epoch + batch + 1
    raise StageError(
        f"training diverged: loss {record.losses[batch].item()} at epoch {epoch}, step {step} "
        f"(batch {batch + 1} of {steps_per_epoch}), learning rate {record.lrs[batch]:g} "
        f"(train.learning_rate = {p.learning_rate}); lower train.learning_rate"
    )


def validate(
    model: nn.Module, val_loader: Iterable, val_labels: torch.Tensor, record: EpochRecord
) -> dict[str, float]:
    """The epoch's metrics: mean train loss, and loss and accuracy on the validation split."""
    val_loss, predictions = test_loop(val_loader, model)
    return {
        "train/loss": record.mean_loss(),
        "val/loss": val_loss,
        "val/accuracy": accuracy(predictions, val_labels),
    }


def open_live(live_dir: Path) -> Live:
    try:
        return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False)
    except SCMError as exc:  # dvclive reads the git revision and fails in a repo with no commit
        raise StageError(f"dvclive needs a git repository with a commit here: {exc}") from None


def log_epoch(live: Live, metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        live.log_metric(name, round(value, 6))
    live.next_step()


@task(name="train", cache_policy=NONE, persist_result=False)
def train(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    weights_path: Path = TRAINED_WEIGHTS,
    live_dir: Path = LIVE_DIR,
    checkpoint_path: Path = CHECKPOINT,
) -> dict[str, float]:
    log = stage_logger("train")
    p = params.train
    configure_determinism(p.deterministic, log)
    device = resolve_device(params.device, log)
    num_threads = configure_threads(p.num_threads, log)
    require_writable(weights_path, live_dir, checkpoint_path)
    order_generator = seed_everything(params.seed)
    augment = make_augment(p, params.seed)
    train_data = load_dataset(processed_dir, "train", device, augment)
    val_data = load_dataset(processed_dir, "val", device)
    if p.batch_size > len(train_data):
        raise StageError(
            f"train.batch_size = {p.batch_size}: larger than the train split ({len(train_data)})"
        )
    train_loader = make_loader(train_data, p.batch_size, shuffle=True, generator=order_generator)
    val_loader = make_loader(val_data, params.evaluate.batch_size, shuffle=False)
    steps_per_epoch = len(train_loader)

    model = build_model(p).to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    optimizer = make_optimizer(model, p)
    scheduler = make_scheduler(optimizer, p, steps_per_epoch)
    generators = {
        "order": order_generator,
        "augment": augment.generator if augment is not None else None,
    }
    expected = fingerprints(params, device, num_threads, processed_dir)
    sampler = train_loader.batch_sampler
    assert isinstance(sampler, IndexBatchSampler)

    at = Progress(epoch=1, order=order_generator.get_state())
    resumed = load_checkpoint(checkpoint_path, expected, log)
    if resumed is not None:
        restore_training(resumed, model, optimizer, scheduler, generators, device)
        at = Progress.from_state(resumed, device)
        log.info(
            "resuming from %s: epoch %d, batch %d of %d",
            checkpoint_path,
            at.epoch,
            len(at.record.losses),
            steps_per_epoch,
        )

    def checkpoint() -> None:
        trained = training_state(model, optimizer, scheduler, generators, device)
        save_checkpoint(checkpoint_path, expected, {**at.to_state(), **trained})

    def after_batch(record: EpochRecord) -> None:
        done = len(record.losses)
        if done % FINITE_CHECK_EVERY == 0:  # a device sync every few batches, not every batch
            require_finite(record, at.epoch, steps_per_epoch, p, start=done - FINITE_CHECK_EVERY)
        step = (at.epoch - 1) * steps_per_epoch + done
        if p.checkpoint_every_steps and step % p.checkpoint_every_steps == 0:
            require_finite(record, at.epoch, steps_per_epoch, p)  # never checkpoint divergence
            checkpoint()

    log.info(
        "training %d epochs on %d images, batch %d, %s lr %g",
        p.epochs,
        len(train_data),
        p.batch_size,
        p.optimizer,
        p.learning_rate,
    )
    # The weights and the curves are replaced together, once training has finished.
    with (
        atomic_path(weights_path) as weights_staging,
        atomic_dir(live_dir) as live_staging,
        open_live(live_staging) as live,
    ):
        for metrics in at.history:
            log_epoch(live, metrics)
        bar = tqdm(total=p.epochs, initial=at.epoch - 1, desc="train", unit="epoch")
        while at.epoch <= p.epochs:
            order_generator.set_state(at.order)
            sampler.skip = len(at.record.losses)
            train_loop(train_loader, model, loss_fn, optimizer, scheduler, at.record, after_batch)
            require_finite(at.record, at.epoch, steps_per_epoch, p)
            metrics = validate(model, val_loader, val_data.labels, at.record)
            at.history.append(metrics)
            log_epoch(live, metrics)
            bar.update()
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}", val_acc=f"{metrics['val/accuracy']:.4f}"
            )
            log.info(
                "epoch %d/%d: %s",
                at.epoch,
                p.epochs,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            )
            at = Progress(at.epoch + 1, order_generator.get_state(), history=at.history)
            checkpoint()
        bar.close()
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        torch_save(state, weights_staging)
    Path(checkpoint_path).unlink(missing_ok=True)
    log.info("wrote %s", weights_path)
    return at.history[-1]


def main(argv: list[str] | None = None) -> int:
    return run_cli(train, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
