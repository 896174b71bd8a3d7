"""python -m stages.evaluate

Scores models/train/model_weights.pth on the test split. Writes to reports/evaluate/:
metrics.json (accuracy, loss, macro_f1: shown by `dvc metrics show`), per_class.csv (precision,
recall, F1 and support per class), confusion.csv (a DVC confusion plot), and the PNGs
confusion_matrix.png and training_curves.png. The latter draws train's dvclive curves by epoch
(from 1): the train loss beside the val loss under the same objective (label smoothing included),
then the plain val cross-entropy, then the val accuracy.
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("evaluate", __doc__)

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NONE

from stages import numerics
from stages.artifacts import atomic_paths, file_digest, json_text, require_writable
from stages.config import EVAL_DIR, LIVE_DIR, PROCESSED_DIR, TRAINED_WEIGHTS, Params
from stages.dataset import load_dataset, make_loader
from stages.device import resolve_device
from stages.errors import StageError
from stages.fashion_mnist import CLASSES, NUM_CLASSES
from stages.model import load_model, test_loop
from stages.records import (
    RECORD_FILE,
    make_record,
    read_record,
    recorded_outputs,
    require_output,
    trained_with,
)
from stages.runtime import run_cli, stage_logger

# What this stage writes into reports/evaluate/ (dvc.yaml lists the same files).
OUT_FILES = (
    "metrics.json",
    "per_class.csv",
    "confusion.csv",
    "confusion_matrix.png",
    "training_curves.png",
    RECORD_FILE,
)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """counts[actual, predicted]."""
    pairs = labels.to(torch.int64) * NUM_CLASSES + predictions.to(torch.int64)
    return torch.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class_table(counts: torch.Tensor) -> pd.DataFrame:
    counts = counts.to(torch.float64)
    hits = counts.diag()
    precision = hits / counts.sum(dim=0).clamp(min=1)
    recall = hits / counts.sum(dim=1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return pd.DataFrame(
        {
            "class": CLASSES,
            "precision": precision.numpy().round(6),
            "recall": recall.numpy().round(6),
            "f1": f1.numpy().round(6),
            "support": counts.sum(dim=1).to(torch.int64).numpy(),
        }
    )


def save_figure(figure: Figure, path: Path) -> None:
    # Figure without pyplot: no GUI backend, no global state, nothing to close.
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})


def plot_confusion(counts: torch.Tensor, accuracy: float, dest: Path) -> None:
    figure = Figure(figsize=(7.5, 6.5))
    axes = figure.subplots()
    image = axes.imshow(counts.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(NUM_CLASSES), CLASSES, rotation=45, ha="right")
    axes.set_yticks(range(NUM_CLASSES), CLASSES)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(f"Test confusion matrix (accuracy {accuracy:.2%})")
    threshold = counts.max().item() / 2
    for actual in range(NUM_CLASSES):
        for predicted in range(NUM_CLASSES):
            value = int(counts[actual, predicted])
            color = "white" if value > threshold else "black"
            axes.text(predicted, actual, value, ha="center", va="center", fontsize=7, color=color)
    save_figure(figure, dest)


# train's dvclive curves, one row per epoch (dvclive's `step`, from 1).
CURVES = ("train/loss", "val/loss_train_objective", "val/loss", "val/accuracy")


class CurvesFormatError(StageError):
    """A dvclive curve file is not what the train stage writes."""


def read_curve(path: Path, name: str) -> pd.DataFrame:
    """One curve as dvclive writes it: numeric, finite `step` and value columns, one row per
    epoch; anything else is refused, naming the file."""
    column = name.split("/")[-1]
    if not path.is_file():
        raise CurvesFormatError(f"{path}: missing; run the train stage first")
    try:
        frame = pd.read_csv(path, sep="\t")
    except ValueError as exc:  # pandas' parser errors, undecodable bytes, an empty file
        problem = f"not a tab-separated table ({str(exc).strip().splitlines()[0]})"
    else:
        missing = [c for c in ("step", column) if c not in frame.columns]
        if missing:
            problem = f"no {' or '.join(map(repr, missing))} column"
        elif frame.empty:
            problem = "no rows"
        else:
            values = frame[["step", column]].apply(pd.to_numeric, errors="coerce")
            bad = [c for c in values if not np.isfinite(values[c].to_numpy(float)).all()]
            if not bad:
                return values
            problem = f"a {bad[0]!r} value that is not a finite number"
    raise CurvesFormatError(
        f"{path}: {problem}; expected dvclive's columns 'step' and {column!r}, one numeric row "
        "per epoch; rerun the train stage"
    )


def read_training_curves(live_dir: Path) -> dict[str, pd.DataFrame]:
    """train's dvclive curves, by metric name."""
    return {
        name: read_curve(Path(live_dir) / "plots" / "metrics" / f"{name}.tsv", name)
        for name in CURVES
    }


def curve_panels(label_smoothing: float) -> list[tuple[str, str, dict[str, str]]]:
    """Each panel's title, y label, and curves (metric name: legend): losses are compared only
    under the same objective."""
    objective = f"cross-entropy, label smoothing {label_smoothing:g}"
    return [
        (
            f"Training objective ({objective})",
            "loss",
            {
                "train/loss": "train loss (mean over the epoch's batches, while training)",
                "val/loss_train_objective": "val loss (same objective, after the epoch)",
            },
        ),
        (
            "Validation loss (plain cross-entropy, as the test loss)",
            "loss",
            {"val/loss": "val loss (no label smoothing)"},
        ),
        ("Validation accuracy", "accuracy", {"val/accuracy": "val accuracy"}),
    ]


def training_curves_figure(curves: dict[str, pd.DataFrame], label_smoothing: float) -> Figure:
    figure = Figure(figsize=(16, 4.5), layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, (title, ylabel, legends) in zip(axes, curve_panels(label_smoothing), strict=True):
        for name, legend in legends.items():
            frame = curves[name]
            ax.plot(frame["step"], frame[name.split("/")[-1]], marker="o", label=legend)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


@task(name="evaluate", cache_policy=NONE, persist_result=False)
def evaluate(
    params: Params,
    processed_dir: Path = PROCESSED_DIR,
    weights_path: Path = TRAINED_WEIGHTS,
    live_dir: Path = LIVE_DIR,
    out_dir: Path = EVAL_DIR,
) -> dict[str, float]:
    log = stage_logger("evaluate")
    require_writable(*(Path(out_dir) / name for name in OUT_FILES), files=True)
    device = resolve_device(params.device, log)
    numerics.configure_torch()  # as train ran: the CNN's convolutions on the same path
    # The weights and test split must be the files their stages recorded; the network's shape
    # comes from the train record, not from params.yaml as it may be now.
    train_record_path = Path(weights_path).with_name(RECORD_FILE)
    train_record = read_record(train_record_path, "train")
    trained = trained_with(train_record, train_record_path)
    used = {
        Path(weights_path).name: require_output(train_record, train_record_path, weights_path),
        **recorded_outputs(
            Path(processed_dir) / RECORD_FILE, "preprocess", Path(processed_dir) / "test.pt"
        ),
    }
    test_data = load_dataset(processed_dir, "test", device)
    model = load_model(weights_path, trained, device)
    curves = read_training_curves(live_dir)
    loss, predictions = test_loop(
        make_loader(test_data, params.evaluate.batch_size, shuffle=False), model
    )
    labels = test_data.labels.cpu()
    counts = confusion_matrix(labels, predictions)
    table = per_class_table(counts)
    metrics = {
        "accuracy": round(counts.diag().sum().item() / len(test_data), 6),
        "loss": round(loss, 6),
        "macro_f1": round(float(table["f1"].mean()), 6),
    }
    pairs = pd.DataFrame(
        {
            "actual": [CLASSES[i] for i in labels.tolist()],
            "predicted": [CLASSES[i] for i in predictions.tolist()],
        }
    )
    with atomic_paths(*(Path(out_dir) / name for name in OUT_FILES)) as staged:
        outs = dict(zip(OUT_FILES, staged, strict=True))
        outs["metrics.json"].write_text(json_text(metrics))
        outs["per_class.csv"].write_text(table.to_csv(index=False))
        outs["confusion.csv"].write_text(pairs.to_csv(index=False))
        plot_confusion(counts, metrics["accuracy"], outs["confusion_matrix.png"])
        save_figure(
            training_curves_figure(curves, trained.label_smoothing),
            outs["training_curves.png"],
        )
        made = {name: file_digest(outs[name], "sha256") for name in OUT_FILES[:-1]}
        asked = {"device": params.device, "evaluate": params.evaluate.model_dump(mode="json")}
        record = make_record("evaluate", asked, used, made, ran_on={"device": str(device)})
        outs[RECORD_FILE].write_text(json_text(record))
    log.info(
        "test accuracy %.4f, loss %.4f, macro F1 %.4f",
        metrics["accuracy"],
        metrics["loss"],
        metrics["macro_f1"],
    )
    log.info("per class:\n%s", table.to_string(index=False))
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_cli(evaluate, parse_args("evaluate", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(evaluate, ARGS))
