"""python -m stages.export

Publishes the trained model: models/model_weights.pth (the state_dict, CPU tensors, checked to
load with torch.load(weights_only=True) into a fresh model with strict=True),
models/model.safetensors, and a model card in models/model_card.json and models/model_card.md.
The card is built from the records of the stages that made the weights (models/train/record.json,
which holds preprocess's) and scored them (reports/evaluate/record.json): the params, input
normalisation, raw data sha256 and code digest that made them, and their test metrics. The
weights and metrics are checked against those records first.
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

from prefect import task
from prefect.cache_policies import NONE
from safetensors.torch import save_file

from stages.artifacts import (
    atomic_paths,
    file_digest,
    json_text,
    require_writable,
    torch_save,
)
from stages.config import (
    EVAL_DIR,
    EXPORT_DIR,
    TRAINED_WEIGHTS,
    Params,
)
from stages.errors import StageError
from stages.fashion_mnist import CLASSES
from stages.model import architecture, describe, load_model
from stages.records import RECORD_FILE, RecordError, read_record, require_output, trained_with
from stages.runtime import run_cli, stage_logger

# What this stage writes into models/ (dvc.yaml lists the same files).
OUT_FILES = ("model_weights.pth", "model.safetensors", "model_card.json", "model_card.md")
METRIC_KEYS = {"accuracy", "loss", "macro_f1"}


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
    rows = "\n".join(f"| {name} | `{sha256}` |" for name, sha256 in card["data"].items())
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

| raw file | sha256 |
|---|---|
{rows}

Trained by the stage code with sha256 `{card["code"]["stages_sha256"]}` on
`{card["trained_on"]["device"]}`; exported by fashion-mnist-pipeline
{card["code"]["package_version"]}.
torch {card["torch_version"]}. Full params: `model_card.json`.
"""


def card_params(train_record: dict[str, Any], params: Params) -> dict[str, Any]:
    """The params that made the weights (from the records), and export's own."""
    trained = train_record["params"]
    return {
        "seed": trained["seed"],
        "device": trained["device"],
        "preprocess": train_record["preprocess"]["params"]["preprocess"],
        "train": trained["train"],
        "export": params.export.model_dump(mode="json"),
    }


def scored_metrics(eval_dir: Path, weights_name: str, weights_sha256: str) -> dict[str, float]:
    """evaluate's metrics, checked to be of these weights and as evaluate wrote them."""
    record_path = Path(eval_dir) / RECORD_FILE
    record = read_record(record_path, "evaluate")
    metrics_path = Path(eval_dir) / "metrics.json"
    metrics = read_metrics(metrics_path)
    if record["inputs"].get(weights_name) != weights_sha256:
        scored = str(record["inputs"].get(weights_name))
        raise RecordError(
            f"{metrics_path}: scores other weights (sha256 {scored[:12]}…, per {record_path}) "
            f"than {weights_name} ({weights_sha256[:12]}…); rerun the evaluate stage "
            "(dvc repro -s evaluate)"
        )
    require_output(record, record_path, metrics_path)
    return metrics


@task(name="export", cache_policy=NONE, persist_result=False)
def export(
    params: Params,
    weights_path: Path = TRAINED_WEIGHTS,
    eval_dir: Path = EVAL_DIR,
    out_dir: Path = EXPORT_DIR,
) -> dict[str, Any]:
    log = stage_logger("export")
    require_writable(*(Path(out_dir) / name for name in OUT_FILES), files=True)
    # Every input is read before any out is touched: a missing one leaves the old outs in place.
    # The card describes what made the weights (train's record), not params.yaml as it is now.
    record_path = Path(weights_path).with_name(RECORD_FILE)
    record = read_record(record_path, "train")
    weights_sha256 = require_output(record, record_path, weights_path)
    p = trained_with(record, record_path)
    if p != params.train:
        log.warning(
            "params.yaml's train section differs from the one %s was trained with; the card "
            "describes the weights (run `dvc repro` to train with the new params)",
            weights_path,
        )
    model = load_model(weights_path, p)
    metrics = scored_metrics(eval_dir, Path(weights_path).name, weights_sha256)

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
            "input": {"shape": [1, 28, 28], "dtype": "float32", "normalize": record["normalize"]},
            "metrics": metrics,
            "params": card_params(record, params),
            "data": record["preprocess"]["inputs"],
            "code": {
                "package_version": version("fashion-mnist-pipeline"),
                "stages_sha256": record["code"]["stages_sha256"],
            },
            "torch_version": record["code"]["torch"].split("+")[0],
            "trained_on": record["ran_on"],
            "trained_weights_sha256": weights_sha256,
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
