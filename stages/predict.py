"""python -m stages.predict (IMAGE | FOLDER | --test-index N) [--onnx] [--json] [--model-dir DIR]

Classifies clothing photos with the exported model (the export stage's models/) and prints the
three likeliest FashionMNIST classes with their probabilities, one line per image (--json: one
JSON object). IMAGE is a PNG or JPEG file; FOLDER, every *.png, *.jpg and *.jpeg file in it;
--test-index N, image N of the test split, printed with its true label.

By default the model is PyTorch's: DIR/model_weights.pth, built as DIR/model_card.json says.
With --onnx it is DIR/model.onnx under onnxruntime, and torch is never imported: a deployer
needs only numpy, Pillow and onnxruntime. Either way the weights (or the ONNX file) must have the
sha256 the card records, so the card's normalisation and classes belong to them.
"""

# The command line is parsed before numpy, Pillow and torch load, as in stages/verify.py, and like
# there parse_args is defined in this module, which E402 would flag.
# ruff: noqa: E402

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL_DIR = Path("models")
DEFAULT_DATA_DIR = Path("data")

CONVERSION = """\
how an image is converted (to look like the training data, as Fashion-MNIST made it):
  1. orientation from its EXIF tag; transparent parts put on white; then grayscale;
  2. inverted when more than half of its border pixels are light (a photo on a white or light
     background), since the dataset shows light clothing on a black background;
  3. unless it is 28x28 already: the background level (the border's median) subtracted, the
     picture trimmed to its content, fitted into 28x28 with its aspect ratio kept (longest side
     28 pixels) and centred on black;
  4. scaled to 0..1 and normalised with the mean and std in the model card.
Works best on one garment, whole, on a plain background.

examples:
  python -m stages.predict shirt.jpg
  python -m stages.predict photos/ --onnx --json
  python -m stages.predict --test-index 0
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; standard library only, so --help answers before numpy or torch load."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.predict",
        description=__doc__,
        epilog=CONVERSION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "input", nargs="?", type=Path, help="a PNG or JPEG file, or a folder of them"
    )
    source.add_argument(
        "--test-index",
        type=_index,
        metavar="N",
        help="image N of the test split: DATA/processed/test.pt, or with --onnx (no torch to "
        "read that) the same image from the raw files DATA/raw/t10k-*.gz",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="run DIR/model.onnx with onnxruntime, without torch"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        metavar="DIR",
        help="the exported model and its card (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DATA",
        help="where --test-index reads the test split (default: %(default)s)",
    )
    return parser.parse_args(argv)


def _index(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected 0 or more")
    return value


if __name__ == "__main__":  # --help and a bad argument answer before numpy, Pillow or torch load
    ARGS = parse_args()

import gzip
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.errors import StageError

# stages.fashion_mnist's facts, repeated because that module imports torch (a test holds them
# equal).
IMAGE_SIDE = 28
RAW_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model_weights.pth"
ONNX_FILE = "model.onnx"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TOP_K = 3
BATCH = 256  # images per forward pass: a folder of thousands never needs one huge array
LIGHT = 127  # a pixel above this is light
# After the background is subtracted, what trimming counts as content: above JPEG noise.
CONTENT_LEVEL = 24

Logits = Callable[[np.ndarray], np.ndarray]


class PredictError(StageError):
    """Printed as one `error: …` line, exit code 1."""


@dataclass(frozen=True)
class Model:
    """A loaded model: float32 [N,1,28,28] normalised images -> float32 [N,classes] logits."""

    logits: Logits
    path: Path
    runtime: str  # "torch 2.14.1" or "onnxruntime 1.32.0"
    card: dict[str, Any]


@dataclass(frozen=True)
class Item:
    """One image to classify: its name in the output, and its uint8 [28,28] pixels."""

    name: str
    pixels: np.ndarray
    label: str | None = None  # the true class, for a test-split image


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def one_line(text: object) -> str:
    """onnxruntime's and Pillow's messages can span lines; an `error:` line must not."""
    return " ".join(str(text).split())


# The model and its card


def missing_model(path: Path) -> PredictError:
    return PredictError(
        f"{path}: missing; fetch the exported model with `dvc pull` (from the DVC remote), or "
        "make it with `dvc repro`"
    )


def read_card(model_dir: Path) -> dict[str, Any]:
    """The model card, checked for the fields predict uses."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise missing_model(path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PredictError(f"{path}: not valid JSON ({one_line(exc)}); export again") from None
    except OSError as exc:
        raise PredictError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        norm = card["input"]["normalize"]
        usable = (
            all(isinstance(name, str) for name in card["classes"])
            and len(card["classes"]) >= TOP_K
            and all(isinstance(norm[k], int | float) for k in ("mean", "std"))
            and norm["std"] > 0
            and isinstance(card["files"], dict)
        )
    except (KeyError, TypeError):
        usable = False
    if not usable:
        raise PredictError(
            f"{path}: not a model card this command reads (expected classes, input.normalize "
            "and files); export again with `dvc repro`"
        )
    return card


def verified(path: Path, card: dict[str, Any], card_path: Path) -> Path:
    """`path`, once its sha256 is the one the card records for it."""
    if not path.is_file():
        raise missing_model(path)
    recorded = card["files"].get(path.name)
    if not isinstance(recorded, str):
        raise PredictError(
            f"{card_path}: records no sha256 for {path.name} (the card is older than that "
            "file); export again with `dvc repro`"
        )
    actual = sha256(path)
    if actual != recorded:
        raise PredictError(
            f"{path}: sha256 {actual[:12]}… is not the {recorded[:12]}… that {card_path} "
            "records: the card describes another model. Restore the exported pair with "
            "`dvc checkout export`, or export again with `dvc repro`"
        )
    return path


def onnx_model(model_dir: Path, threads: int = 0) -> Model:
    """DIR/model.onnx under onnxruntime's CPU provider; `threads` 0 lets onnxruntime choose."""
    import onnxruntime

    card = read_card(model_dir)
    path = verified(Path(model_dir) / ONNX_FILE, card, Path(model_dir) / CARD_FILE)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own types for a file it cannot run
        raise PredictError(f"{path}: onnxruntime cannot load it ({one_line(exc)})") from None
    name = session.get_inputs()[0].name

    def logits(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return Model(logits, path, f"onnxruntime {onnxruntime.__version__}", card)


def torch_model(model_dir: Path, threads: int = 0) -> Model:
    """DIR/model_weights.pth in the network the card's train params describe."""
    import torch
    from pydantic import ValidationError

    from stages import numerics
    from stages.config import TrainParams
    from stages.model import load_model

    card = read_card(model_dir)
    card_path = Path(model_dir) / CARD_FILE
    path = verified(Path(model_dir) / WEIGHTS_FILE, card, card_path)
    try:
        trained = TrainParams.model_validate(card["params"]["train"])
    except (KeyError, TypeError, ValidationError):
        raise PredictError(
            f"{card_path}: no valid params.train to build the network from; export again"
        ) from None
    if threads:
        torch.set_num_threads(threads)
    numerics.configure_torch()  # the CNN's convolutions on the path evaluate scored them on
    network = load_model(path, trained).eval()

    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(batch)).numpy()

    return Model(logits, path, f"torch {torch.__version__.split('+')[0]}", card)


# Images


def image_files(path: Path) -> list[Path]:
    """The file, or the folder's PNG and JPEG files in name order."""
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise PredictError(
                f"{path}: no PNG or JPEG images in this folder (looked for "
                f"{', '.join('*' + s for s in IMAGE_SUFFIXES)})"
            )
        return files
    if not path.exists():
        raise PredictError(f"{path}: no such file or folder")
    return [path]


def read_image(path: Path) -> np.ndarray:
    """A PNG or JPEG file as uint8 [28,28] pixels in the dataset's look."""
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            image.load()
            return to_dataset_look(image)
    except UnidentifiedImageError:
        raise PredictError(f"{path}: not a PNG or JPEG image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise PredictError(f"{path}: cannot read the image ({one_line(exc)})") from None


def on_white(image: Image.Image) -> Image.Image:
    """Transparent parts composited onto white, as a viewer shows them."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image


def border(pixels: np.ndarray) -> np.ndarray:
    """The pixels of the image's outer ring, about 2 % of its shorter side wide (at least 1)."""
    width = max(1, round(min(pixels.shape) * 0.02))
    inner = pixels[width:-width, width:-width]
    return np.concatenate(
        [
            pixels[:width].ravel(),
            pixels[-width:].ravel(),
            pixels[width:-width, :width].ravel(),
            pixels[width:-width, -width:].ravel(),
        ]
        if inner.size
        else [pixels.ravel()]
    )


def trimmed(pixels: np.ndarray) -> np.ndarray:
    """The smallest box holding every pixel above CONTENT_LEVEL (all of it if there is none)."""
    rows = np.flatnonzero((pixels > CONTENT_LEVEL).any(axis=1))
    cols = np.flatnonzero((pixels > CONTENT_LEVEL).any(axis=0))
    if not rows.size:
        return pixels
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fitted(pixels: np.ndarray) -> np.ndarray:
    """Resized so the longest side is 28 pixels, aspect ratio kept, centred on black."""
    height, width = pixels.shape
    scale = IMAGE_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))
    canvas = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    top, left = (IMAGE_SIDE - size[1]) // 2, (IMAGE_SIDE - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = small
    return canvas


def to_dataset_look(image: Image.Image) -> np.ndarray:
    """Light clothing on black in 28x28 uint8, as the --help epilog describes."""
    gray = on_white(ImageOps.exif_transpose(image)).convert("L")
    pixels = np.asarray(gray, dtype=np.uint8)
    if (border(pixels) > LIGHT).mean() > 0.5:
        pixels = 255 - pixels
    if pixels.shape == (IMAGE_SIDE, IMAGE_SIDE):
        return pixels  # the dataset's own format: taken as it is
    background = int(np.median(border(pixels)))
    level = np.clip(pixels.astype(np.int16) - background, 0, 255).astype(np.uint8)
    return fitted(trimmed(level))


# The test split


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes, with numpy (the processed split needs torch)."""
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise PredictError(
            f"{path}: missing; fetch the data with `dvc pull`, or download it with `dvc repro`"
        ) from None
    except (OSError, EOFError) as exc:
        raise PredictError(f"{path}: not a readable gzip file ({one_line(exc)})") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= header else None
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if magic != 0x0800 | ndim or len(data) != header + math.prod(shape):
        raise PredictError(f"{path}: not an IDX file of {ndim}-dimensional unsigned bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def raw_test_split(raw_dir: Path, card: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The test split from the raw files, which preprocess copies into test.pt unchanged, each
    file checked against the sha256 the card records for the data the model was made from."""
    paths = [Path(raw_dir) / name for name in RAW_TEST_FILES]
    for path in paths:
        recorded = card.get("data", {}).get(path.name)
        if recorded is not None and path.is_file() and sha256(path) != recorded:
            raise PredictError(
                f"{path}: sha256 is not the {recorded[:12]}… the model card records; "
                "restore the data with `dvc checkout download`"
            )
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(labels) != len(images):
        raise PredictError(f"{paths[0]}: expected as many 28x28 images as {paths[1]} has labels")
    return images, labels


def processed_test_split(processed_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from stages.fashion_mnist import load_split

    images, labels = load_split(processed_dir, "test")
    return images.numpy(), labels.numpy()


def test_item(index: int, data_dir: Path, model: Model, onnx: bool) -> Item:
    if onnx:
        images, labels = raw_test_split(Path(data_dir) / "raw", model.card)
    else:
        images, labels = processed_test_split(Path(data_dir) / "processed")
    if index >= len(labels):
        raise PredictError(
            f"--test-index {index}: the test split has {len(labels)} images, numbered 0 to "
            f"{len(labels) - 1}"
        )
    classes = model.card["classes"]
    return Item(f"test image {index}", images[index].copy(), classes[int(labels[index])])


# Classifying


def normalised(pixels: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    """float32 [N,1,28,28]: scaled to 0..1 and normalised in float32, as the Dataset does."""
    norm = card["input"]["normalize"]
    scaled = pixels[:, None].astype(np.float32) / np.float32(255.0)
    return (scaled - np.float32(norm["mean"])) / np.float32(norm["std"])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def classify(model: Model, items: list[Item]) -> list[dict[str, Any]]:
    """Each item's top-3 classes with probabilities, most likely first."""
    classes = model.card["classes"]
    results = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        logits = model.logits(normalised(np.stack([i.pixels for i in chunk]), model.card))
        if logits.shape != (len(chunk), len(classes)):
            raise PredictError(
                f"{model.path}: gives logits of shape {list(logits.shape)}, expected "
                f"[{len(chunk)}, {len(classes)}] for the card's {len(classes)} classes"
            )
        for item, probs in zip(chunk, softmax(logits), strict=True):
            top = np.argsort(-probs, kind="stable")[:TOP_K]
            result: dict[str, Any] = {
                "input": item.name,
                "top": [
                    {"class": classes[k], "index": int(k), "probability": round(float(probs[k]), 6)}
                    for k in top
                ],
            }
            if item.label is not None:
                result["true_label"] = item.label
            results.append(result)
    return results


def render(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [f"{model['name']} ({model['file']}, {model['runtime']})"]
    for result in report["predictions"]:
        name = result["input"]
        if "true_label" in result:
            name += f" (true label: {result['true_label']})"
        top = ", ".join(f"{t['class']} {t['probability'] * 100:.1f} %" for t in result["top"])
        lines.append(f"{name}: {top}")
    return "\n".join(lines)


def predict(args: argparse.Namespace) -> dict[str, Any]:
    model = onnx_model(args.model_dir) if args.onnx else torch_model(args.model_dir)
    if args.test_index is not None:
        items = [test_item(args.test_index, args.data_dir, model, args.onnx)]
    else:
        items = [Item(str(path), read_image(path)) for path in image_files(args.input)]
    return {
        "model": {
            "name": model.card.get("model_name", "model"),
            "file": str(model.path),
            "runtime": model.runtime,
        },
        "predictions": classify(model, items),
    }


def run(args: argparse.Namespace) -> int:
    try:
        report = predict(args)
    except StageError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run(ARGS))
