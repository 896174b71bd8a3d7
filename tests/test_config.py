import re
from pathlib import Path

import pytest

from stages.config import Params, ParamsError, load_params, parse_params

from .helpers.tools import REPO


def test_committed_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.train.hidden_sizes == [512, 512]
    assert params.device == "auto"


def test_readme_shows_params_yaml_as_it_is() -> None:
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"^```yaml\n(.*?)^```$", readme, re.M | re.S)
    assert shown is not None, "README.md has no ```yaml block"
    assert shown.group(1) == (REPO / "params.yaml").read_text()


def test_missing_sections_take_defaults() -> None:
    assert parse_params({}) == Params()


def test_committed_params_state_the_code_defaults() -> None:
    # A key deleted from params.yaml must not silently change what is trained.
    assert load_params(REPO / "params.yaml") == Params()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lerning_rate": 0.1}}, "train.lerning_rate = 0.1: unknown key"),
        ({"trian": {}}, "trian = {}: unknown key"),
        ({"train": {"epochs": "ten"}}, "train.epochs = 'ten': Input should be a valid integer"),
        ({"train": {"epochs": 0}}, "train.epochs = 0: Input should be greater than 0"),
        (
            {"train": {"learning_rate": 0}},
            "train.learning_rate = 0: Input should be greater than 0",
        ),
        ({"train": {"learning_rate": -1.0}}, "train.learning_rate = -1.0"),
        ({"train": {"batch_size": 0}}, "train.batch_size = 0"),
        ({"train": {"hidden_sizes": []}}, "train.hidden_sizes = []"),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer = 'lbfgs': Input should be 'sgd'"),
        ({"train": {"model": "vit"}}, "train.model = 'vit': Input should be 'mlp' or 'cnn'"),
        ({"train": {"init": "xavier"}}, "train.init = 'xavier': Input should be 'torch' or"),
        ({"train": {"conv_channels": [8, 8, 8, 8]}}, "train.conv_channels = [8, 8, 8, 8]"),
        ({"preprocess": {"val_fraction": 1.0}}, "preprocess.val_fraction = 1.0"),
        ({"preprocess": {"mean": 0.3}}, "set both mean and std"),
        ({"device": "gpu"}, "device = 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
        ({"seed": -1}, "seed = -1"),
    ],
)
def test_bad_values_are_named(raw: dict, expected: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert expected in str(info.value)


def test_unknown_key_lists_the_allowed_ones() -> None:
    with pytest.raises(ParamsError, match="allowed keys here: epochs, batch_size, learning_rate"):
        parse_params({"train": {"epoch": 3}})


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: not valid YAML"):
        load_params(path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="cannot read parameters"):
        load_params(tmp_path / "absent.yaml")
