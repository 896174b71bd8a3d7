"""python -m stages.export

Publishes the trained model: models/model_weights.pth (the state_dict, CPU tensors, checked to
load with torch.load(weights_only=True) into a fresh model with strict=True),
models/model.safetensors, models/model.onnx (opset 18, dynamic batch dimension), and a model card
in models/model_card.json and models/model_card.md.
The card is built from the records of the stages that made the weights (models/train/record.json,
which holds preprocess's) and scored them (reports/evaluate/record.json): the params, input
normalisation, raw data sha256 and code digest that made them, and their test metrics. The
weights and metrics are checked against those records first.
Before any out is replaced, onnxruntime runs model.onnx on the whole test split
(data/processed/test.pt, the one evaluate scored, normalised with the card's mean and std) beside
PyTorch: the largest logit difference must be at most 1e-4 and the argmax must agree on at least
99.99 % of the images, or the stage fails. The card records the opset, the file's sha256 and
these figures.
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

import numpy as np
import onnxruntime
import torch
from prefect import task
from prefect.cache_policies import NONE
from safetensors.torch import save_file
from torch import nn

from stages import numerics
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
    PROCESSED_DIR,
    TRAINED_WEIGHTS,
    Params,
)
from stages.dataset import normalize_images
from stages.errors import StageError
from stages.fashion_mnist import CLASSES, IMAGE_SIDE, load_split, split_path
from stages.model import architecture, describe, load_model
from stages.records import RECORD_FILE, RecordError, read_record, require_output, trained_with
from stages.runtime import run_cli, stage_logger

# What this stage writes into models/ (dvc.yaml lists the same files); the card gives the sha256
# of each model file.
MODEL_FILES = ("model_weights.pth", "model.safetensors", "model.onnx")
OUT_FILES = (*MODEL_FILES, "model_card.json", "model_card.md")
METRIC_KEYS = {"accuracy", "loss", "macro_f1"}

# Fixed, not the exporter's default, so that a torch upgrade cannot change what deployers get
# unnoticed. 18 is the opset torch's exporter translates to natively (its torchlib's), and every
# onnxruntime that pyproject.toml allows (>= 1.20) runs it.
ONNX_OPSET = 18
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
# What the ONNX file must reproduce on the whole test split. float32 logits of this network differ
# by a few 1e-6 between two correct implementations; 1e-4 still catches a wrong weight or op.
ONNX_MAX_ABS_DIFF = 1e-4
ONNX_MIN_AGREEMENT = 0.9999  # at most 1 of the 10,000 test images may change class
CHECK_BATCH = 1000  # images per forward pass in the check


class OnnxCheckError(StageError):
    """onnxruntime's logits for the exported file differ from PyTorch's beyond the thresholds."""


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

{render_onnx(card)}

| raw file | sha256 |
|---|---|
{rows}

Trained by the stage code with sha256 `{card["code"]["stages_sha256"]}` on
`{card["trained_on"]["device"]}`; exported by fashion-mnist-pipeline
{card["code"]["package_version"]}.
torch {card["torch_version"]}. Full params: `model_card.json`.
"""


def render_onnx(card: dict[str, Any]) -> str:
    onnx, check = card["onnx"], card["onnx"]["check"]
    diff = f"at most {check['max_abs_diff_at_most']:g} (allowed {check['max_abs_diff_allowed']:g})"
    agreement = (
        f"{percent(check['argmax_agreement'])} "
        f"(required {percent(check['argmax_agreement_required'])})"
    )
    return f"""| `{onnx["file"]}` | for onnxruntime, no torch needed (docs/serving.md) |
|---|---|
| sha256 | `{card["files"][onnx["file"]]}` |
| opset | {onnx["opset"]} |
| input | `{onnx["input"]}`: float32 `[batch, 1, 28, 28]`, normalised as above; any batch size |
| output | `{onnx["output"]}`: float32 `[batch, 10]` |
| checked | with onnxruntime {check["onnxruntime_version"]} against PyTorch on the \
{check["images"]} test images |
| max abs logit difference | {diff} |
| argmax agreement | {agreement} |

```bash
python -m stages.predict --onnx shirt.jpg
```"""


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


def scored_test_inputs(
    eval_dir: Path, processed_dir: Path, mean: float, std: float
) -> torch.Tensor:
    """The test split evaluate scored, as the network takes it: [N,1,28,28], normalised with the
    card's mean and std exactly as evaluate's Dataset normalises."""
    record_path = Path(eval_dir) / RECORD_FILE
    record = read_record(record_path, "evaluate")
    path = split_path(processed_dir, "test")
    scored = str(record["inputs"].get(path.name))
    try:
        actual = file_digest(path, "sha256")
    except FileNotFoundError:
        raise StageError(f"{path}: missing; run the preprocess stage first") from None
    if actual != scored:
        raise RecordError(
            f"{path}: sha256 {actual[:12]}… is not the test split evaluate scored "
            f"({scored[:12]}…, per {record_path}); rerun the pipeline (dvc repro)"
        )
    images, labels = load_split(processed_dir, "test")
    if not len(labels):
        raise StageError(f"{path}: no images, so nothing to check model.onnx on")
    return normalize_images(images, mean, std)


def onnx_bytes(model: nn.Module) -> bytes:
    """The network as ONNX with a dynamic batch dimension, by torch's torch.export-based exporter
    (no network access, deterministic bytes for the same weights)."""
    # Batch 2: torch.export specialises a dimension of size 1 to a constant.
    example = torch.zeros(2, 1, IMAGE_SIDE, IMAGE_SIDE)
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto
    # "2.14.1", not "2.14.1+cu130": the CPU and CUDA builds of one torch write the same bytes.
    proto.producer_version = proto.producer_version.split("+")[0]
    # Each node's stack trace names the absolute path of stages/model.py: the bytes would then
    # depend on where the checkout is. The rest of its provenance does not, and stays.
    for node in proto.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return proto.SerializeToString()


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    # No layout transformations: ORT's NCHWc one picks its block size by the CPU's vector width,
    # and the CNN's recorded figures (hence the card's bytes) would then depend on the CPU.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3  # errors only: its warnings are not ours to act on
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def percent(fraction: float) -> str:
    return f"{fraction * 100:.2f} %"


def check_onnx(path: Path, model: nn.Module, inputs: torch.Tensor, dest: Path) -> dict[str, Any]:
    """Runs the ONNX file at `path` (written for `dest`) on `inputs` with onnxruntime beside the
    PyTorch model; returns the figures for the card, or raises OnnxCheckError naming both figures
    and their thresholds."""
    session = onnx_session(path)
    model.eval()
    expected: list[np.ndarray] = []
    got: list[np.ndarray] = []
    # In batches: the CNN's first activations for all 10,000 images at once would take gigabytes.
    with torch.no_grad():
        for batch in inputs.split(CHECK_BATCH):
            expected.append(model(batch).numpy())
            got.append(session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.numpy()})[0])
    expected_all, got_all = np.concatenate(expected), np.concatenate(got)
    figures = compare_logits(expected_all, got_all, dest)
    exact = float(np.abs(got_all.astype(np.float64) - expected_all).max())
    stage_logger("export").info(
        "model.onnx: max abs logit difference %.3g, argmax agreement %.4f on %d test images",
        exact,
        figures["argmax_agreement"],
        figures["images"],
    )
    return figures


def decade_above(value: float) -> float:
    """The smallest power of ten >= `value` (at least 1e-7): what the card records.

    onnxruntime's kernels follow the CPU, so the last bits of its logits, and the exact maximum
    difference, may differ between machines; the card, an out in dvc.lock, must not. The exact
    figure goes to the log."""
    exponent = -7 if not value > 1e-7 else math.ceil(math.log10(value))
    return float(f"1e{exponent}")


def compare_logits(expected: np.ndarray, got: np.ndarray, dest: Path) -> dict[str, Any]:
    """The check's figures; raises OnnxCheckError unless both are within their thresholds."""
    count = len(expected)
    # NaN compares false to everything: a NaN logit counts as a failure, never a pass.
    diff = float(np.abs(got.astype(np.float64) - expected).max())
    agree = int((got.argmax(axis=1) == expected.argmax(axis=1)).sum())
    figures = {
        "images": count,
        "max_abs_diff_at_most": decade_above(diff),
        "max_abs_diff_allowed": ONNX_MAX_ABS_DIFF,
        "argmax_agreement": round(agree / count, 6),
        "argmax_agreement_required": ONNX_MIN_AGREEMENT,
        "onnxruntime_version": onnxruntime.__version__,
    }
    if not (diff <= ONNX_MAX_ABS_DIFF and agree / count >= ONNX_MIN_AGREEMENT):
        raise OnnxCheckError(
            f"{dest}: onnxruntime {onnxruntime.__version__} disagrees with PyTorch on the "
            f"{count} test images: max abs logit difference {diff:.3g} (allowed "
            f"<= {ONNX_MAX_ABS_DIFF:g}), argmax agreement {percent(agree / count)} ({agree} of "
            f"{count}; required >= {percent(ONNX_MIN_AGREEMENT)}); no out was replaced"
        )
    return figures


@task(name="export", cache_policy=NONE, persist_result=False)
def export(
    params: Params,
    weights_path: Path = TRAINED_WEIGHTS,
    eval_dir: Path = EVAL_DIR,
    out_dir: Path = EXPORT_DIR,
    processed_dir: Path = PROCESSED_DIR,
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
    numerics.configure_torch()  # the CNN's PyTorch logits on the path train and evaluate took
    model = load_model(weights_path, p)
    metrics = scored_metrics(eval_dir, Path(weights_path).name, weights_sha256)
    normalize = record["normalize"]
    test_inputs = scored_test_inputs(eval_dir, processed_dir, normalize["mean"], normalize["std"])

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    with atomic_paths(*(Path(out_dir) / name for name in OUT_FILES)) as staged:
        outs = dict(zip(OUT_FILES, staged, strict=True))
        torch_save(state, outs["model_weights.pth"])
        load_model(outs["model_weights.pth"], p)  # the tutorial's reload, as users will do it
        save_file(state, outs["model.safetensors"], metadata={"constructor": describe(p)})
        outs["model.onnx"].write_bytes(onnx_bytes(model))
        # The file as written, so a failure here replaces no out.
        check = check_onnx(outs["model.onnx"], model, test_inputs, Path(out_dir) / "model.onnx")
        files = {name: file_digest(outs[name], "sha256") for name in MODEL_FILES}
        card = {
            "model_name": params.export.model_name,
            "architecture": architecture(p),
            "constructor": describe(p),
            "hidden_sizes": p.hidden_sizes,
            "classes": list(CLASSES),
            "input": {"shape": [1, 28, 28], "dtype": "float32", "normalize": normalize},
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
            "onnx": {
                "file": "model.onnx",
                "opset": ONNX_OPSET,
                "input": ONNX_INPUT,
                "output": ONNX_OUTPUT,
                "dynamic_batch": True,
                "exporter": "torch.onnx.export(dynamo=True)",
                "check": {"split": "test", **check},
            },
        }
        outs["model_card.json"].write_text(json_text(card))
        outs["model_card.md"].write_text(render_card(card))
    log.info("exported %s (test accuracy %.4f)", ", ".join(files), metrics["accuracy"])
    return card


def main(argv: list[str] | None = None) -> int:
    return run_cli(export, parse_args("export", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(export, ARGS))
