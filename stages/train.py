"""python -m stages.train

Trains the tutorial's NeuralNetwork on data/processed/train.pt, checking accuracy on the
validation split after each epoch. Optimizer, learning rate, batch size, epochs, loss settings,
seed and device come from params.yaml. Writes the state_dict to models/train/model_weights.pth
and the per-epoch curves (train loss, val loss, val accuracy) with dvclive to reports/train/.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from prefect import task
from prefect.cache_policies import NONE
from scmrepo.exceptions import SCMError
from torch import nn
from tqdm import tqdm

from stages.artifacts import save_torch
from stages.config import LIVE_DIR, PROCESSED_DIR, TRAINED_WEIGHTS, Params, TrainParams
from stages.dataset import ShiftFlip, load_dataset, make_loader
from stages.device import configure_threads, resolve_device
from stages.errors import StageError
from stages.model import NeuralNetwork, test_loop
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


def make_scheduler(
    optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per batch; learning_rate is the peak (onecycle) or starting (cosine) rate."""
    total = p.epochs * steps_per_epoch
    if p.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, p.learning_rate, total_steps=total)
    if p.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def train_loop(
    dataloader, model: nn.Module, loss_fn: nn.Module, optimizer, scheduler=None
) -> float:
    """The tutorial's train loop; returns the epoch's mean loss (one device sync per epoch)."""
    model.train()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    count = 0
    for x, y in dataloader:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * y.shape[0]
        count += y.shape[0]
    return loss_sum.item() / count


def open_live(live_dir: Path) -> Live:
    try:
        return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False)
    except SCMError as exc:  # dvclive reads the git revision and fails in a repo with no commit
        raise StageError(f"dvclive needs a git repository with a commit here: {exc}") from None


@task(name="train", cache_policy=NONE, persist_result=False)
def train(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    weights_path: Path = TRAINED_WEIGHTS,
    live_dir: Path = LIVE_DIR,
) -> dict[str, float]:
    log = stage_logger("train")
    p = params.train
    device = resolve_device(params.device)
    configure_threads(p.num_threads)
    generator = seed_everything(params.seed)
    train_data = load_dataset(processed_dir, "train", device, make_augment(p, params.seed))
    val_data = load_dataset(processed_dir, "val", device)
    if p.batch_size > len(train_data):
        raise StageError(
            f"train.batch_size = {p.batch_size}: larger than the train split ({len(train_data)})"
        )
    train_loader = make_loader(train_data, p.batch_size, shuffle=True, generator=generator)
    val_loader = make_loader(val_data, params.evaluate.batch_size, shuffle=False)

    model = NeuralNetwork(p.hidden_sizes).to(device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    optimizer = make_optimizer(model, p)
    scheduler = make_scheduler(optimizer, p, len(train_loader))
    log.info(
        "training %d epochs on %d images, batch %d, %s lr %g",
        p.epochs,
        len(train_data),
        p.batch_size,
        p.optimizer,
        p.learning_rate,
    )

    history: dict[str, float] = {}
    with open_live(live_dir) as live:
        epochs = tqdm(range(1, p.epochs + 1), desc="train", unit="epoch")
        for epoch in epochs:
            train_loss = train_loop(train_loader, model, loss_fn, optimizer, scheduler)
            if not math.isfinite(train_loss):
                raise StageError(
                    f"training diverged: loss {train_loss} in epoch {epoch} with "
                    f"train.learning_rate = {p.learning_rate}; lower the learning rate"
                )
            val_loss, predictions = test_loop(val_loader, model)
            val_accuracy = (predictions == val_data.labels.cpu()).double().mean().item()
            history = {"train/loss": train_loss, "val/loss": val_loss, "val/accuracy": val_accuracy}
            for name, value in history.items():
                live.log_metric(name, round(value, 6))
            live.next_step()
            epochs.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{val_accuracy:.4f}")
            log.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f",
                epoch,
                p.epochs,
                train_loss,
                val_loss,
                val_accuracy,
            )

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_torch(state, weights_path)
    log.info("wrote %s", weights_path)
    return history


def main(argv: list[str] | None = None) -> int:
    return run_cli(train, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
