"""python -m stages.export

Publishes the trained model: models/model_weights.pth (the state_dict, CPU tensors, checked to
load with torch.load(weights_only=True) into a fresh model with strict=True),
models/model.safetensors, and a model card in
models/model_card.json and models/model_card.md with the params, the test metrics, the input
normalisation, the raw data checksums and the code version.
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("export", __doc__)

import json
import math
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NONE
from safetensors.torch import save_file

from stages.artifacts import (
    atomic_paths,
    file_digest,
    json_text,
    require_writable,
    source_digest,
    torch_save,
)
from stages.config import (
    EVAL_DIR,
    EXPORT_DIR,
    PROCESSED_DIR,
    RAW_DIR,
    TRAINED_WEIGHTS,
    Params,
)
from stages.errors import StageError
from stages.fashion_mnist import CLASSES, load_stats
from stages.model import architecture, describe, load_model
from stages.runtime import run_cli, stage_logger

CARD_PARAMS = {"seed", "device", "preprocess", "train", "export"}
# What this stage writes into models/ (dvc.yaml lists the same files).
OUT_FILES = ("model_weights.pth", "model.safetensors", "model_card.json", "model_card.md")
METRIC_KEYS = {"accuracy", "loss", "macro_f1"}


def code_version() -> dict[str, str]:
    """The package version and a hash of the stage code that ran.

    Not the git commit: the card is a DVC out, and a commit recorded in it would change the
    card's hash with every commit, so a rerun on the same code would never match dvc.lock.
    """
    return {"package_version": version("fashion-mnist-pipeline"), "stages_sha256": source_digest()}


def data_checksums(raw_dir: Path) -> dict[str, dict[str, str]]:
    files = sorted(Path(raw_dir).glob("*.gz"))
    if not files:
        raise StageError(f"{raw_dir}: no raw files; run the download stage first")
    return {
        f.name: {"md5": file_digest(f, "md5"), "sha256": file_digest(f, "sha256")} for f in files
    }


def read_metrics(path: Path) -> dict[str, float]:
    """evaluate's test metrics, checked for the keys the card shows."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: missing; run the evaluate stage first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); rerun the evaluate stage") from None
    numbers = isinstance(metrics, dict) and all(
        isinstance(metrics.get(key), int | float)
        and not isinstance(metrics[key], bool)
        and math.isfinite(metrics[key])  # JSON readers take NaN; the card must stay valid JSON
        for key in METRIC_KEYS
    )
    if not numbers:
        raise StageError(
            f"{path}: expected an object with the finite numbers "
            f"{', '.join(sorted(METRIC_KEYS))}; rerun the evaluate stage"
        )
    return metrics


def render_card(card: dict[str, Any]) -> str:
    metrics = card["metrics"]
    norm = card["input"]["normalize"]
    rows = "\n".join(f"| {name} | `{sums['md5']}` |" for name, sums in card["data"].items())
    return f"""# {card["model_name"]}

{card["architecture"]}, trained on FashionMNIST (10 classes: {", ".join(CLASSES)}).

| test metric | value |
|---|---|
| accuracy | {metrics["accuracy"]:.4f} |
| loss | {metrics["loss"]:.4f} |
| macro F1 | {metrics["macro_f1"]:.4f} |

**Input**: float32 `[N, 1, 28, 28]`, pixels scaled to 0..1, then
`(x - {norm["mean"]}) / {norm["std"]}`.

```python
import torch
from stages.model import {card["constructor"].split("(")[0]}

model = {card["constructor"]}
model.load_state_dict(torch.load("models/model_weights.pth", weights_only=True), strict=True)
model.eval()
```

| raw file | md5 |
|---|---|
{rows}

Code: fashion-mnist-pipeline {card["code"]["package_version"]}, stages sha256
`{card["code"]["stages_sha256"]}`.
torch {card["torch_version"]}. Full params: `model_card.json`.
"""


@task(name="export", cache_policy=NONE, persist_result=False)
def export(
    params: Params,
    weights_path: Path = TRAINED_WEIGHTS,
    processed_dir: Path = PROCESSED_DIR,
    raw_dir: Path = RAW_DIR,
    eval_dir: Path = EVAL_DIR,
    out_dir: Path = EXPORT_DIR,
) -> dict[str, Any]:
    log = stage_logger("export")
    require_writable(*(Path(out_dir) / name for name in OUT_FILES), files=True)
    p = params.train
    # Every input is read before any out is touched: a missing one leaves the old outs in place.
    model = load_model(weights_path, p)
    metrics = read_metrics(Path(eval_dir) / "metrics.json")
    mean, std = load_stats(processed_dir)
    data = data_checksums(raw_dir)

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    with atomic_paths(*(Path(out_dir) / name for name in OUT_FILES)) as staged:
        outs = dict(zip(OUT_FILES, staged, strict=True))
        torch_save(state, outs["model_weights.pth"])
        load_model(outs["model_weights.pth"], p)  # the tutorial's reload, as users will do it
        save_file(state, outs["model.safetensors"], metadata={"constructor": describe(p)})
        files = {name: file_digest(outs[name], "sha256") for name in OUT_FILES[:2]}
        card = {
            "model_name": params.export.model_name,
            "architecture": architecture(p),
            "constructor": describe(p),
            "hidden_sizes": p.hidden_sizes,
            "classes": list(CLASSES),
            "input": {
                "shape": [1, 28, 28],
                "dtype": "float32",
                "normalize": {"mean": mean, "std": std},
            },
            "metrics": metrics,
            # The params that decide the weights; dvc.yaml tracks exactly these for this stage.
            "params": params.model_dump(mode="json", include=CARD_PARAMS),
            "data": data,
            "code": code_version(),
            "torch_version": torch.__version__.split("+")[0],
            "files": files,
        }
        outs["model_card.json"].write_text(json_text(card))
        outs["model_card.md"].write_text(render_card(card))
    log.info("exported %s (test accuracy %.4f)", ", ".join(files), metrics["accuracy"])
    return card


def main(argv: list[str] | None = None) -> int:
    return run_cli(export, parse_args("export", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(export, ARGS))
