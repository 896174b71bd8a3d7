"""dvc.yaml's deps name all the code each stage runs, so editing any of it reruns the stage."""

import ast
from pathlib import Path

import yaml

from .helpers.tools import REPO


def stage_imports(module: Path) -> set[str]:
    """The stages/*.py files a stage module imports, directly or through each other."""
    seen: set[str] = set()
    todo = [module, Path("stages/__init__.py")]  # run first by any `stages.<name>` import
    while todo:
        path = todo.pop()
        if path.as_posix() in seen:
            continue
        seen.add(path.as_posix())
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                candidate = Path(*name.split(".")).with_suffix(".py")
                if name.startswith("stages.") and (REPO / candidate).is_file():
                    todo.append(candidate)
    return seen


def stage_modules() -> dict[str, tuple[Path, set[str]]]:
    """Each stage's module (from its `python -m stages.<name>` command) and its code deps."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {
        name: (
            Path(stage["cmd"].removeprefix("python -m ").replace(".", "/") + ".py"),
            {dep for dep in stage["deps"] if dep.startswith("stages/")},
        )
        for name, stage in stages.items()
    }


def test_every_stage_depends_on_the_code_it_imports() -> None:
    for name, (module, code_deps) in stage_modules().items():
        missing = stage_imports(module) - code_deps
        assert not missing, f"{name}: code it runs but not in its deps: {sorted(missing)}"


def test_no_stage_depends_on_code_it_does_not_import() -> None:
    """Else editing that code reruns the stage for nothing (preprocess once reran when the
    network changed)."""
    for name, (module, code_deps) in stage_modules().items():
        extra = code_deps - stage_imports(module)
        assert not extra, f"{name}: deps on code it does not import: {sorted(extra)}"


def test_preprocess_needs_neither_the_network_nor_the_dataset_code() -> None:
    imports = stage_imports(Path("stages/preprocess.py"))
    assert "stages/fashion_mnist.py" in imports
    assert not imports & {"stages/model.py", "stages/dataset.py"}


def test_export_builds_its_card_from_the_records_not_from_params() -> None:
    """The card holds what made the weights (train's record) and what scored them (evaluate's):
    export depends on both, and on no params but its own, so `dvc repro -s export` after a
    params edit cannot write a card with params the weights were not trained with."""
    export = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["export"]
    records = {"models/train/record.json", "reports/evaluate/record.json", "pyproject.toml"}
    assert records <= set(export["deps"])
    assert export["params"] == ["export"]
