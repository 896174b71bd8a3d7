"""params.yaml, validated once into typed objects.

Every stage calls `load_params()` before it does any work. A bad value is reported by its dotted
name (`train.learning_rate`), the value found and what is allowed, as a `ParamsError`.

params.yaml is read as DVC reads it (YAML 1.2, ruamel), so that what a stage uses is what DVC
hashes into dvc.lock. A value that YAML 1.1 (PyYAML, and most other tools) reads differently, such
as `010` or `yes`, is refused, since the person who wrote it may have meant either.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml import YAMLError as YAML12Error

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

# [0-9], not \d (which takes any Unicode digit); matched with fullmatch, so no trailing newline.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")

# params.yaml holds a few dozen values. A document expanding to more is an alias bomb or a mistake,
# refused before pydantic walks it and before an error message quotes it.
MAX_VALUES = 10_000
MAX_QUOTED_CHARS = 100  # a value quoted in an error message is cut to this
MAX_PROBLEMS = 20  # lines listed in one ParamsError; the rest are counted

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ParamsError(StageError):
    """params.yaml is missing, unreadable, or holds a value outside what is allowed."""


class Section(BaseModel):
    # strict: YAML already types its scalars; "10" for an int is a mistake, not a conversion.
    # No float param has a use for .inf or .nan: refused here, not blamed on another key later.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DownloadParams(Section):
    retries: Annotated[int, Field(ge=1, le=20)] = 3
    # Bounded, so that the waits stay finite numbers a socket and time.sleep() accept.
    backoff_s: Annotated[float, Field(ge=0, le=600)] = 1.0
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0


class PreprocessParams(Section):
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    # Both null: computed from the train split. Both set: taken as they are (pixel scale 0..1).
    mean: Annotated[float, Field(ge=0, le=1)] | None = None
    # FashionMNIST's pixel std is about 0.35; a tiny one blows the inputs up, and training diverges.
    std: Annotated[float, Field(ge=1e-3, le=1)] | None = None

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
    # bf16: forward and loss under torch.autocast in bfloat16; weights, optimizer state and the
    # saved weights stay fp32, and so do evaluation and export (docs/results.md "bf16").
    precision: Literal["fp32", "bf16"] = "fp32"
    # per_pixel: train on each pixel standardised over the train split (a diagonal preconditioner
    # for the first layer), then fold that into the first layer, so that the saved weights take
    # stats.json's inputs as always (docs/results.md "The fast profile"). The MLP only.
    input_scaling: Literal["global", "per_pixel"] = "global"
    # Data-parallel training (docs/ddp.md): 1 trains in this process, as always; N > 1 starts N
    # workers with torchrun, each on its share of every global batch of batch_size images.
    nproc_per_node: Annotated[int, Field(ge=1)] = 1
    # Machines, each running the stage with these params, meeting at FMNIST_RDZV_ENDPOINT.
    nnodes: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _per_pixel_scaling_needs_the_mlp(self) -> TrainParams:
        if self.input_scaling == "per_pixel" and self.model != "mlp":
            # A convolution's zero padding does not commute with a per-pixel shift: no exact fold.
            raise ValueError("input_scaling = 'per_pixel' needs model = 'mlp'")
        return self


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
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError("expected auto, cpu, cuda, cuda:N (N < 1000) or mps")
        return value


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, 80, 80, 40
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 10


def _quote(value: Any) -> str:
    """repr(value), cut short: a huge value must not make a huge message (or take minutes)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path)


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    dotted = _dotted(error["loc"])
    value = _quote(error.get("input"))
    if error["type"] == "extra_forbidden":
        owner: Any = model
        for part in error["loc"][:-1]:
            owner = owner.model_fields[str(part)].annotation
        allowed = ", ".join(owner.model_fields)
        return f"{dotted} = {value}: unknown key; allowed keys here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{dotted} = {value}: {message}"


def _count_values(raw: Any, limit: int) -> int:
    """How many values `raw` expands to (keys, scalars, lists, mappings), counted up to limit + 1.

    YAML aliases make one list appear many times; each is counted once per appearance, but
    measured once (by id), so a billion laughs is counted in microseconds. A list that holds
    itself counts as more than the limit.
    """
    measured: dict[int, int] = {}

    def count(value: Any) -> int:
        if not isinstance(value, dict | list):
            return 1
        if id(value) in measured:
            return measured[id(value)]
        measured[id(value)] = limit + 1  # while inside it: an alias back to it never ends
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        total = 1
        for item in items:
            total += count(item)
            if total > limit:
                break
        measured[id(value)] = min(total, limit + 1)
        return measured[id(value)]

    return count(raw)


def _refuse_expansion(raw: Any, source: str) -> None:
    if _count_values(raw, MAX_VALUES) > MAX_VALUES:
        raise ParamsError(
            f"{source}: expands to more than {MAX_VALUES} values (YAML aliases?); "
            "params.yaml holds a few dozen"
        )


def _problems_message(source: str, problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return f"{source}: invalid parameters\n  " + "\n  ".join(shown)


def _validate(raw: Any, source: str, dialect_problems: list[str]) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    _refuse_expansion(raw, source)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e, Params) for e in exc.errors(include_url=False)]
        raise ParamsError(_problems_message(source, problems + dialect_problems)) from None
    if dialect_problems:
        raise ParamsError(_problems_message(source, dialect_problems))
    return params


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validates an already-parsed params mapping; raises ParamsError naming every bad key."""
    return _validate(raw, source, [])


# YAML 1.2 floats with an exponent: YAML 1.1 wants a dot in them (1.0e-3) and reads 1e-3 as text.
# Reading them as numbers is what DVC does, and no one writes 1e-3 meaning the text.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _exponent_float(new: Any, old: Any) -> bool:
    return type(new) is float and isinstance(old, str) and bool(_EXPONENT_FLOAT.fullmatch(old))


def _same(new: Any, old: Any) -> bool:
    if type(new) is not type(old):
        return False
    if isinstance(new, float) and math.isnan(new):
        return math.isnan(old)
    return bool(new == old)


def _differences(new: Any, old: Any) -> Iterator[tuple[tuple[Any, ...], str, Any, Any]]:
    """Where two readings of one document differ: (path, "key" or "value", new, old).

    Called only on a document within MAX_VALUES, so the walk is short; shared lists and mappings
    (aliases) are compared once.
    """
    seen: set[tuple[int, int]] = set()

    def walk(path: tuple[Any, ...], new: Any, old: Any) -> Iterator[Any]:
        if isinstance(new, dict) and isinstance(old, dict):
            if (id(new), id(old)) in seen:
                return
            seen.add((id(new), id(old)))
            if len(new) != len(old):  # two keys that one reading takes as the same key
                yield path, "keys", list(new), list(old)
                return
            for (new_key, new_value), (old_key, old_value) in zip(
                new.items(), old.items(), strict=True
            ):
                if _same(new_key, old_key):
                    yield from walk((*path, new_key), new_value, old_value)
                else:
                    yield (*path, new_key), "key", new_key, old_key
        elif isinstance(new, list) and isinstance(old, list):
            if (id(new), id(old)) in seen:
                return
            seen.add((id(new), id(old)))
            if len(new) != len(old):
                yield path, "value", new, old
                return
            for index, (new_item, old_item) in enumerate(zip(new, old, strict=True)):
                yield from walk((*path, index), new_item, old_item)
        elif not _same(new, old) and not _exponent_float(new, old):
            yield path, "value", new, old

    return walk((), new, old)


def _reading(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the text {_quote(value)}"
    return _quote(value)


def _hint(new: Any, old: Any) -> str:
    if isinstance(old, bool) and isinstance(new, str):
        return f"{_reading(old)}; write true or false, or quote it if text is meant"
    if isinstance(new, str) and ":" in new and isinstance(old, int | float):
        return f"{_reading(old)} (base 60); write a plain number, or quote it if text is meant"
    numbers = (int, float)
    if type(new) in numbers and type(old) in numbers:
        return f"{_reading(old)}; write {new} or {old} without the leading zero"
    if type(new) in numbers and isinstance(old, str):
        return f"{_reading(old)}; write {new} as a plain decimal number"
    return f"{_reading(old)}; write it so that both read the same (quote text)"


def _source_text(node: yaml.Node | None, path: tuple[Any, ...]) -> str | None:
    """The scalar at `path` as written in the file, from PyYAML's node tree; None if not found."""
    for part in path:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            node = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part),
                None,
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            return None
    plain = isinstance(node, yaml.ScalarNode) and not node.style  # None, or "" from libyaml
    return node.value if plain else None


def _dialect_problems(text: str, raw: Any) -> list[str]:
    """Every key whose value YAML 1.1 reads differently from YAML 1.2 (`raw`, as DVC reads it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        old = loader.construct_document(node) if node is not None else None
    except Exception:  # unreadable as YAML 1.1: then no YAML 1.1 reading can differ
        return []
    finally:
        loader.dispose()
    problems = []
    for path, kind, new, old_value in _differences(raw, old):
        dotted = _dotted(path) or "(the whole file)"
        if kind == "key":
            problems.append(
                f"{dotted}: YAML 1.2 (DVC) reads this key as {_reading(new)}, YAML 1.1 as "
                f"{_reading(old_value)}; quote it"
            )
        elif kind == "keys":
            problems.append(
                f"{dotted}: YAML 1.2 (DVC) reads the keys {_quote(new)}, YAML 1.1 reads "
                f"{_quote(old_value)}; quote the keys"
            )
        else:
            written = _source_text(node, path) or _quote(new)
            problems.append(
                f"{dotted} = {written}: YAML 1.2 (DVC) reads {_reading(new)}, YAML 1.1 reads "
                f"{_hint(new, old_value)}"
            )
    return problems


def _yaml_error(exc: Exception, path: Path) -> str:
    # ruamel's advice on duplicate keys is for its Python API; DVC, reading the file, has none.
    text = str(exc).split("\n\nTo suppress this check", 1)[0].strip()
    return text.replace('in "<unicode string>"', f'in "{path}"')


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read parameters ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        # Exactly as DVC reads params.yaml (dvc.utils.serialize.parse_yaml).
        raw = YAML(typ="safe").load(text)
    except YAML12Error as exc:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_error(exc, path)}") from None
    except ValueError as exc:  # a scalar its type cannot hold, such as the date 2024-02-30
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML: nested too deeply") from None
    try:
        # Before anything walks it: an alias bomb is small as read, huge as walked.
        _refuse_expansion(raw, str(path))
        return _validate(raw, str(path), _dialect_problems(text, raw))
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML: nested too deeply") from None
