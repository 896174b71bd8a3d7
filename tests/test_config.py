import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


def test_the_readmes_table_of_common_keys_shows_their_defaults() -> None:
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \| `?([^`|]+?)`? \|", readme, re.M)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert len(rows) >= 5, "README.md lost its table of the keys people change most"
    for key, shown in rows:
        value = params
        for part in key.split("."):
            value = value[part]
        assert yaml.safe_load(shown) == value, f"README shows {key} = {shown}, params.yaml {value}"


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
        ({"device": "gpu"}, "device = 'gpu': expected auto, cpu, cuda, cuda:N (N < 1000) or mps"),
        ({"device": "cuda:99999999999999999999"}, "device = 'cuda:99999999999999999999': expected"),
        ({"device": "cuda:1000"}, "device = 'cuda:1000': expected"),
        ({"device": "cuda\n"}, "device = 'cuda\\n': expected"),
        ({"device": "cuda:\u0663"}, "device = 'cuda:\u0663': expected"),  # an Arabic-Indic 3
        (
            {"download": {"backoff_s": 1e300}},
            "download.backoff_s = 1e+300: Input should be less than or equal to 600",
        ),
        (
            {"download": {"timeout_s": 1e9}},
            "download.timeout_s = 1000000000.0: Input should be less than or equal to 3600",
        ),
        (
            {"preprocess": {"mean": 0.3, "std": 1e-45}},
            "preprocess.std = 1e-45: Input should be greater than or equal to 0.001",
        ),
        (
            {"train": {"weight_decay": float("inf")}},
            "train.weight_decay = inf: Input should be a finite number",
        ),
        (
            {"train": {"learning_rate": float("nan")}},
            "train.learning_rate = nan: Input should be a finite number",
        ),
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


def test_device_index_up_to_three_digits_is_accepted() -> None:
    assert parse_params({"device": "cuda:999"}).device == "cuda:999"


def test_yaml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ParamsError, match=r"line 2, column 11"):
        load_params(path)


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_params_are_read_as_dvc_reads_them(tmp_path: Path) -> None:
    # YAML 1.2, as DVC reads params.yaml (ruamel): 1e-3 is a number, not the text '1e-3'.
    params = load_params(write_params(tmp_path, "train:\n  learning_rate: 1e-3\n"))
    assert params.train.learning_rate == 0.001
    text = "download:\n  backoff_s: 1.5E+1\n  timeout_s: 2e2\n"
    assert load_params(write_params(tmp_path, text)).download.timeout_s == 200.0


def test_params_are_read_with_dvcs_own_parser(tmp_path: Path) -> None:
    from dvc.utils.serialize import parse_yaml

    text = (REPO / "params.yaml").read_text().replace("0.0005", "5e-4").replace("0.1 #", "1E-1 #")
    assert load_params(write_params(tmp_path, text)) == parse_params(parse_yaml(text, "params"))
    assert load_params(tmp_path / "params.yaml").train.weight_decay == 5e-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed: 010\n", "seed = 010: YAML 1.2 (DVC) reads 10, YAML 1.1 reads 8;"),
        ("seed: -010\n", "seed = -010: YAML 1.2 (DVC) reads -10, YAML 1.1 reads -8;"),
        ("seed: 09\n", "seed = 09: YAML 1.2 (DVC) reads 9, YAML 1.1 reads the text '09';"),
        ("seed: 0o17\n", "seed = 0o17: YAML 1.2 (DVC) reads 15, YAML 1.1 reads the text '0o17';"),
        ("train:\n  epochs: 1:20\n", "train.epochs = '1:20': Input should be a valid integer"),
        (
            "train:\n  epochs: 1:20\n",
            "train.epochs = 1:20: YAML 1.2 (DVC) reads the text '1:20', YAML 1.1 reads 80",
        ),
        ("train:\n  hflip: yes\n", "train.hflip = yes: YAML 1.2 (DVC) reads the text 'yes', YAML"),
        ("train:\n  hflip: Off\n", "YAML 1.2 (DVC) reads the text 'Off', YAML 1.1 reads false;"),
        ("train:\n  hidden_sizes: [512, 0512]\n", "train.hidden_sizes.1 = 0512: YAML 1.2 (DVC)"),
        ("train:\n  on: 1\n", "train.on: YAML 1.2 (DVC) reads this key as the text 'on', YAML 1.1"),
    ],
)
def test_values_the_two_yaml_dialects_read_differently_are_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    # DVC reads params.yaml as YAML 1.2, PyYAML and most other tools as YAML 1.1.
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 'params.yaml'}: invalid parameters\n  ")
    assert expected in str(info.value)


def test_every_key_read_differently_is_named(tmp_path: Path) -> None:
    text = "seed: 010\ndevice: cpu\ntrain:\n  epochs: 1:20\n  hflip: on\n"
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, text))
    for key in ("seed = 010:", "train.epochs = 1:20:", "train.hflip = on:"):
        assert f"\n  {key} YAML 1.2 (DVC)" in str(info.value)


def test_a_yaml_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    # PyYAML keeps the last one silently; DVC refuses the file.
    with pytest.raises(ParamsError, match=r"(?s)not valid YAML: .*duplicate key.*line 2"):
        load_params(write_params(tmp_path, "seed: 1\nseed: 2\n"))


def test_non_utf8_params_are_refused_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes("# Réglages\nseed: 42\n".encode("latin-1"))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == (f"{path}: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8")


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """The billion laughs: each level a list of `width` aliases to the level before."""
    lines = [f"  - &a0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"  - &a{level} [{', '.join([f'*a{level - 1}'] * width)}]")
    return "lol:\n" + "\n".join(lines) + f"\ntrain:\n  hidden_sizes: *a{levels - 1}\n"


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = write_params(tmp_path, alias_bomb())
    started = time.monotonic()
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert time.monotonic() - started < 1.0
    assert str(info.value) == (
        f"{path}: expands to more than 10000 values (YAML aliases?); params.yaml holds a few dozen"
    )


def test_an_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"expands to more than 10000 values \(YAML aliases\?\)"):
        load_params(write_params(tmp_path, "train:\n  hidden_sizes: &a [1, *a]\n"))


def test_values_quoted_in_errors_are_cut_short() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({"train": {"model": "x" * 100_000, "hidden_sizes": [[0] * 50] * 50}})
    lines = str(info.value).splitlines()
    assert lines[1].startswith("  train.model = 'xxx") and "..." in lines[1]
    assert max(len(line) for line in lines) < 200, max(lines, key=len)


def test_a_long_list_of_errors_is_cut_short() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({"train": {"hidden_sizes": [0] * 5000}})
    lines = str(info.value).splitlines()
    assert len(lines) < 30
    assert lines[1] == "  train.hidden_sizes.0 = 0: Input should be greater than 0"
    assert lines[-1] == "  ... and 4980 more"


def test_load_params_needs_no_torch() -> None:
    # Flows and tools read params without paying for torch's import.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from stages.config import load_params\n"
        "print(load_params().train.epochs)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "20\n"
