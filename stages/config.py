"""params.yaml, validated once into typed objects.

Every stage calls `load_params()` before it does any work. A bad value is reported by its dotted
name (`train.learning_rate`), the value found and what is allowed, as a `ParamsError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.errors import StageError

PARAMS_FILE = Path("params.yaml")

# Stage inputs and outputs, relative to the repository root. dvc.yaml names the same paths.
RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
TRAINED_WEIGHTS = Path("models/train/model_weights.pth")
LIVE_DIR = Path("reports/train")
# Outside every DVC out, so resuming never makes DVC see the train stage as changed.
CHECKPOINT = Path("models/checkpoints/train.pt")
EVAL_DIR = Path("reports/evaluate")
EXPORT_DIR = Path("models")

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ParamsError(StageError):
    """params.yaml is missing, unreadable, or holds a value outside what is allowed."""


class Section(BaseModel):
    # strict: YAML already types its scalars; "10" for an int is a mistake, not a conversion.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DownloadParams(Section):
    retries: Annotated[int, Field(ge=1, le=20)] = 3
    backoff_s: NonNegativeFloat = 1.0
    timeout_s: PositiveFloat = 60.0


class PreprocessParams(Section):
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    # Both null: computed from the train split. Both set: taken as they are (pixel scale 0..1).
    mean: Annotated[float, Field(ge=0, le=1)] | None = None
    std: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _mean_and_std_together(self) -> PreprocessParams:
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both mean and std, or leave both null to compute them")
        return self


class TrainParams(Section):
    # The same defaults as params.yaml (a test holds them equal): a key left out means this.
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 128
    learning_rate: PositiveFloat = 0.1
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.95
    weight_decay: NonNegativeFloat = 5e-4
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    scheduler: Literal["none", "cosine", "onecycle"] = "onecycle"
    shift_pixels: Annotated[int, Field(ge=0, le=8)] = 0  # augmentation: random shifts
    hflip: bool = False  # augmentation: random left-right flips
    model: Literal["mlp", "cnn"] = "mlp"
    hidden_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [512, 512]
    init: Literal["torch", "kaiming"] = "kaiming"  # initial weights: PyTorch's layer default or He
    conv_channels: Annotated[list[PositiveInt], Field(min_length=1, max_length=3)] = [32, 64]
    num_threads: Annotated[int, Field(ge=0)] = 0  # 0: one per physical core
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0  # 0: at the end of each epoch only
    deterministic: bool = False  # CUDA: deterministic kernels (the CPU path always is)


class EvaluateParams(Section):
    batch_size: PositiveInt = 1000


class ExportParams(Section):
    model_name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = (
        "fashion-mnist-mlp"
    )


class Params(Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    device: str = "auto"
    download: DownloadParams = DownloadParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()

    @field_validator("device")
    @classmethod
    def _device_spec(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    dotted = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        owner: Any = model
        for part in error["loc"][:-1]:
            owner = owner.model_fields[str(part)].annotation
        allowed = ", ".join(owner.model_fields)
        return f"{dotted} = {value!r}: unknown key; allowed keys here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{dotted} = {value!r}: {message}"


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validates an already-parsed params mapping; raises ParamsError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e, Params) for e in exc.errors(include_url=False))
        raise ParamsError(f"{source}: invalid parameters\n  {problems}") from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read parameters ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
