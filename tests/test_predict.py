"""`python -m stages.predict`: every input kind, both runtimes, --json, and each error, on a model
exported from the synthetic data (made once for the module)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import predict
from stages.config import parse_params
from stages.dataset import normalize_images
from stages.evaluate import evaluate
from stages.export import MODEL_FILES, export
from stages.fashion_mnist import CLASSES, IMAGE_SIDE, RAW_FILES, load_split
from stages.preprocess import preprocess
from stages.train import train

from .helpers.data import TINY_PARAMS, write_mirror
from .helpers.tools import REPO, tool_env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder as the pipeline leaves it: data/raw, data/processed and models/."""
    root = tmp_path_factory.mktemp("project")
    params = parse_params(TINY_PARAMS)  # conftest's small_params is function-scoped
    write_mirror(root / "data" / "raw")
    preprocess.fn(params, root / "data" / "raw", root / "data" / "processed")
    weights = root / "models" / "train" / "model_weights.pth"
    train.fn(params, root / "data" / "processed", weights, root / "reports" / "train")
    paths = (root / "data" / "processed", weights, root / "reports" / "train")
    evaluate.fn(params, *paths, root / "reports" / "evaluate")
    export.fn(params, weights, root / "reports" / "evaluate", root / "models", paths[0])
    return root


@pytest.fixture
def model_copy(project: Path, tmp_path: Path) -> Path:
    """A private copy of the exported model folder, for tests that damage it."""
    return Path(shutil.copytree(project / "models", tmp_path / "models"))


def run_main(capsys: pytest.CaptureFixture, project: Path, *args: str) -> tuple[int, str, str]:
    argv = [*args, "--data-dir", str(project / "data")]
    if "--model-dir" not in args:
        argv += ["--model-dir", str(project / "models")]
    code = predict.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def predictions(capsys: pytest.CaptureFixture, project: Path, *args: str) -> list[dict]:
    code, out, err = run_main(capsys, project, *args, "--json")
    assert code == 0, err
    return json.loads(out)["predictions"]


def split_image(project: Path, index: int) -> tuple[np.ndarray, int]:
    """A test-split image of the synthetic data as uint8 [28,28], and its label."""
    images, labels = load_split(project / "data" / "processed", "test")
    return images[index].numpy(), int(labels[index])


def save(pixels: np.ndarray, path: Path, **options: object) -> Path:
    Image.fromarray(pixels).save(path, **options)
    return path


# The command line as a user runs it


def imported(stderr: str) -> set[str]:
    """The modules `python -X importtime` reported importing."""
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if "import time:" in line}


def run_predict(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-X", "importtime", "-m", "stages.predict", *args]
    return subprocess.run(command, cwd=REPO, env=tool_env(), capture_output=True, text=True)


def test_help_answers_before_numpy_pillow_and_torch_load_and_says_how_images_are_converted() -> (
    None
):
    result = run_predict("--help")
    assert result.returncode == 0
    assert "inverted when more than half of its border pixels are light" in result.stdout
    assert "aspect ratio kept" in result.stdout and "model card" in result.stdout
    assert not imported(result.stderr) & {"numpy", "PIL", "torch"}


@pytest.mark.parametrize("source", ["folder", "test-index"])
def test_onnx_never_imports_torch(project: Path, tmp_path: Path, source: str) -> None:
    if source == "folder":
        save(split_image(project, 3)[0], tmp_path / "a.png")
        args = [str(tmp_path)]
    else:
        args = ["--test-index", "3"]
    result = run_predict(
        *args, "--onnx", "--model-dir", str(project / "models"), "--data-dir", str(project / "data")
    )
    assert result.returncode == 0, result.stderr
    modules = imported(result.stderr)
    assert "onnxruntime" in modules and "PIL.Image" in modules
    torch_modules = sorted(m for m in modules if m == "torch" or m.startswith("torch."))
    assert not torch_modules, torch_modules[:5]
    assert "onnxruntime" in result.stdout.splitlines()[0]


def test_an_error_is_one_line_on_stderr_with_exit_code_1(tmp_path: Path) -> None:
    result = run_predict("--onnx", "--model-dir", str(tmp_path), "--test-index", "0")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if "import time:" not in line]
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path / 'model_card.json'}: missing; fetch the")


# Every input kind


def test_a_test_image_gives_the_same_answer_from_torch_and_onnx_with_its_true_label(
    project: Path, capsys: pytest.CaptureFixture
) -> None:
    by_torch = predictions(capsys, project, "--test-index", "5")
    by_onnx = predictions(capsys, project, "--test-index", "5", "--onnx")
    _, label = split_image(project, 5)
    for result in (by_torch[0], by_onnx[0]):
        assert result["input"] == "test image 5"
        assert result["true_label"] == CLASSES[label]
        assert len(result["top"]) == 3
    assert [t["class"] for t in by_torch[0]["top"]] == [t["class"] for t in by_onnx[0]["top"]]
    for a, b in zip(by_torch[0]["top"], by_onnx[0]["top"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_the_onnx_test_image_from_the_raw_files_is_the_processed_one(project: Path) -> None:
    card = predict.read_card(project / "models")
    raw_images, raw_labels = predict.raw_test_split(project / "data" / "raw", card)
    images, labels = load_split(project / "data" / "processed", "test")
    assert np.array_equal(raw_images, images.numpy())
    assert np.array_equal(raw_labels, labels.numpy())


def test_a_28x28_png_of_a_test_image_is_taken_as_it_is(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = save(split_image(project, 5)[0], tmp_path / "five.png")
    assert np.array_equal(predict.read_image(path), split_image(project, 5)[0])
    from_file = predictions(capsys, project, str(path))
    from_split = predictions(capsys, project, "--test-index", "5")
    assert from_file[0]["top"] == from_split[0]["top"]
    assert from_file[0]["input"] == str(path) and "true_label" not in from_file[0]


def test_a_folder_gives_one_prediction_per_png_and_jpeg_in_name_order(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save(split_image(project, 1)[0], tmp_path / "b.jpg", quality=95)
    save(split_image(project, 2)[0], tmp_path / "a.png")
    save(split_image(project, 3)[0], tmp_path / "c.JPEG", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image, and not looked at")
    (tmp_path / "sub.png").mkdir()
    for runtime in ([], ["--onnx"]):
        names = [r["input"] for r in predictions(capsys, project, str(tmp_path), *runtime)]
        assert names == [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.JPEG")]


def test_the_default_output_is_one_line_per_image_with_three_classes_and_percentages(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save(split_image(project, 1)[0], tmp_path / "one.png")
    save(split_image(project, 2)[0], tmp_path / "two.png")
    code, out, _ = run_main(capsys, project, str(tmp_path), "--onnx")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.startswith("fashion-mnist-mlp (") and "model.onnx, onnxruntime " in header
    assert len(lines) == 2 and lines[0].startswith(f"{tmp_path / 'one.png'}: ")
    shares = lines[0].split(": ", 1)[1].split(", ")
    assert len(shares) == 3
    classes = [share.rsplit(" ", 2)[0] for share in shares]
    assert set(classes) <= set(CLASSES) and all(share.endswith(" %") for share in shares)


def test_json_gives_the_top_three_classes_most_likely_first(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = save(split_image(project, 4)[0], tmp_path / "four.png")
    code, out, _ = run_main(capsys, project, str(path), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["model"]["name"] == "fashion-mnist-mlp"
    assert report["model"]["runtime"].startswith("torch ")
    top = report["predictions"][0]["top"]
    assert [t["class"] for t in top] == [CLASSES[t["index"]] for t in top]
    probabilities = [t["probability"] for t in top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


# How an image is made to look like the training data


def photo_on_white(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A near-white RGB photo with a dark garment filling `box` (left, top, right, bottom)."""
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = (40, 30, 60)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("size", "box", "rows", "cols"),
    [
        # A wide garment: 200x100 -> 28x14, centred vertically.
        ((300, 200), (40, 60, 240, 160), (7, 21), (0, 28)),
        # A tall one: 50x150 -> 9x28 (rounded), centred horizontally.
        ((120, 400), (30, 100, 80, 250), (0, 28), (9, 18)),
    ],
)
def test_a_photo_on_white_is_inverted_trimmed_and_fitted_keeping_its_aspect_ratio(
    size: tuple[int, int], box: tuple, rows: tuple[int, int], cols: tuple[int, int]
) -> None:
    pixels = predict.to_dataset_look(photo_on_white(*size, box))
    assert pixels.shape == (IMAGE_SIDE, IMAGE_SIDE) and pixels.dtype == np.uint8
    inside = pixels[rows[0] : rows[1], cols[0] : cols[1]]
    assert inside[1:-1, 1:-1].min() > 150  # the garment, light now
    outside = pixels.copy()
    outside[rows[0] : rows[1], cols[0] : cols[1]] = 0
    assert outside.max() == 0  # padding and background: black, as in the dataset


def test_an_image_on_black_is_not_inverted() -> None:
    pixels = np.zeros((100, 100), dtype=np.uint8)
    pixels[20:80, 30:70] = 200
    converted = predict.to_dataset_look(Image.fromarray(pixels))
    assert converted[14, 14] > 150 and converted[0, 0] == 0


def test_a_transparent_background_counts_as_white(tmp_path: Path) -> None:
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)  # transparent black
    rgba[10:70, 20:60] = (30, 30, 30, 255)  # an opaque dark garment
    path = save(rgba, tmp_path / "cutout.png")
    pixels = predict.read_image(path)
    assert pixels[14, 14] > 150 and pixels[0, 0] == 0


def test_normalisation_is_the_datasets_to_the_bit(project: Path) -> None:
    images, labels = load_split(project / "data" / "processed", "test")
    card = predict.read_card(project / "models")
    norm = card["input"]["normalize"]
    expected = normalize_images(images, norm["mean"], norm["std"])
    assert np.array_equal(predict.normalised(images.numpy(), card), expected.numpy())


def test_the_dataset_facts_repeated_to_avoid_torch_are_the_same() -> None:
    assert predict.IMAGE_SIDE == IMAGE_SIDE
    assert RAW_FILES["test"] == predict.RAW_TEST_FILES
    assert {predict.WEIGHTS_FILE, predict.ONNX_FILE} <= set(MODEL_FILES)


# Errors: one line, naming the problem and its fix


def error_of(capsys: pytest.CaptureFixture, project: Path, *args: str) -> str:
    code, out, err = run_main(capsys, project, *args)
    assert (code, out) == (1, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_file_that_is_no_image_is_named(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "shirt.png").write_text("not a PNG")
    err = error_of(capsys, project, str(tmp_path / "shirt.png"))
    assert err == f"error: {tmp_path / 'shirt.png'}: not a PNG or JPEG image\n"
    save(np.zeros((28, 28), dtype=np.uint8), tmp_path / "shirt.gif", format="GIF")
    assert "shirt.gif: not a PNG or JPEG image" in error_of(
        capsys, project, str(tmp_path / "shirt.gif")
    )


def test_a_truncated_image_is_named(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = save(np.full((64, 64), 128, dtype=np.uint8), tmp_path / "cut.jpg", quality=90)
    path.write_bytes(path.read_bytes()[:200])
    assert f"error: {path}: cannot read the image (" in error_of(capsys, project, str(path))


def test_an_empty_folder_and_a_missing_path_are_named(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    err = error_of(capsys, project, str(tmp_path / "empty"))
    assert "empty: no PNG or JPEG images in this folder (looked for *.png, *.jpg, *.jpeg)" in err
    err = error_of(capsys, project, str(tmp_path / "nowhere.png"))
    assert err == f"error: {tmp_path / 'nowhere.png'}: no such file or folder\n"


@pytest.mark.parametrize("runtime", [[], ["--onnx"]])
@pytest.mark.parametrize("missing", ["model_weights.pth", "model.onnx", "model_card.json"])
def test_a_missing_model_names_dvc_pull_and_dvc_repro(
    project: Path,
    model_copy: Path,
    capsys: pytest.CaptureFixture,
    runtime: list[str],
    missing: str,
) -> None:
    (model_copy / missing).unlink()
    args = ["--test-index", "0", "--model-dir", str(model_copy), *runtime]
    if missing == "model.onnx" and not runtime or missing == "model_weights.pth" and runtime:
        assert run_main(capsys, project, *args)[0] == 0  # the other runtime's file
        return
    err = error_of(capsys, project, *args)
    assert f"{model_copy / missing}: missing;" in err
    assert "`dvc pull`" in err and "`dvc repro`" in err


@pytest.mark.parametrize(
    ("runtime", "name"), [([], "model_weights.pth"), (["--onnx"], "model.onnx")]
)
def test_a_model_file_the_card_does_not_describe_is_refused(
    project: Path,
    model_copy: Path,
    capsys: pytest.CaptureFixture,
    runtime: list[str],
    name: str,
) -> None:
    (model_copy / name).write_bytes((model_copy / name).read_bytes() + b"\0")
    err = error_of(capsys, project, "--test-index", "0", "--model-dir", str(model_copy), *runtime)
    assert f"{model_copy / name}: sha256 " in err
    assert "model_card.json records: the card describes another model" in err
    assert "dvc checkout export" in err


def test_a_card_from_before_the_onnx_export_is_named(
    project: Path, model_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    card = json.loads((model_copy / "model_card.json").read_text())
    del card["files"]["model.onnx"]
    (model_copy / "model_card.json").write_text(json.dumps(card))
    err = error_of(capsys, project, "--test-index", "0", "--onnx", "--model-dir", str(model_copy))
    assert "model_card.json: records no sha256 for model.onnx" in err and "dvc repro" in err


@pytest.mark.parametrize("runtime", [[], ["--onnx"]])
def test_a_test_index_past_the_end_is_named(
    project: Path, capsys: pytest.CaptureFixture, runtime: list[str]
) -> None:
    err = error_of(capsys, project, "--test-index", "40", *runtime)
    assert err == "error: --test-index 40: the test split has 40 images, numbered 0 to 39\n"


def test_raw_test_files_other_than_the_models_are_refused_under_onnx(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = Path(shutil.copytree(project / "data", tmp_path / "data"))
    write_mirror(data / "raw", counts=(120, 50))  # other test images
    code = predict.main(
        ["--test-index", "0", "--onnx", "--model-dir", str(project / "models")]
        + ["--data-dir", str(data)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "t10k-images-idx3-ubyte.gz: sha256 is not the" in err
    assert "dvc checkout download" in err


def test_no_raw_test_files_under_onnx_names_dvc_pull(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = predict.main(
        ["--test-index", "0", "--onnx", "--model-dir", str(project / "models")]
        + ["--data-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 1 and "t10k-images-idx3-ubyte.gz: missing; fetch the data with `dvc pull`" in err


@pytest.mark.e2e
def test_dvc_repro_exports_a_checked_onnx_file_that_predict_runs_without_torch(
    pipeline: tuple[Path, str],
) -> None:
    repo, _ = pipeline
    check = json.loads((repo / "models" / "model_card.json").read_text())["onnx"]["check"]
    assert check["images"] == 10_000  # the whole real test split
    assert check["max_abs_diff_at_most"] <= 1e-4 and check["argmax_agreement"] >= 0.9999
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["export"]
    assert "models/model.onnx" in [out["path"] for out in lock["outs"]]
    assert "data/processed" in [dep["path"] for dep in lock["deps"]]

    command = [sys.executable, "-X", "importtime", "-m", "stages.predict", "--onnx", "--json"]
    result = subprocess.run(
        [*command, "--test-index", "0"], cwd=repo, env=tool_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout)["predictions"][0]
    assert prediction["true_label"] == "Ankle boot"  # the first image of the official test split
    assert not {m for m in imported(result.stderr) if m.split(".")[0] == "torch"}
