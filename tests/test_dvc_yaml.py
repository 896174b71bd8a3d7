"""dvc.yaml's deps name all the code each stage runs, so editing any of it reruns the stage."""

import ast
from pathlib import Path

import yaml

from .conftest import REPO


def stage_imports(module: Path) -> set[str]:
    """The stages/*.py files a stage module imports, directly or through each other."""
    seen: set[str] = set()
    todo = [module]
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


def test_every_stage_depends_on_the_code_it_imports() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = Path(stage["cmd"].removeprefix("python -m ").replace(".", "/") + ".py")
        missing = stage_imports(module) - set(stage["deps"])
        assert not missing, f"{name}: code it runs but not in its deps: {sorted(missing)}"


def test_export_depends_on_everything_its_model_card_records() -> None:
    deps = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["export"]["deps"])
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "stages").glob("*.py")}
    assert (code - {"stages/__init__.py"}) | {"pyproject.toml"} <= deps
