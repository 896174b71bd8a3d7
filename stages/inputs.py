"""What a stage read, checked again before its outs replace the old ones.

DVC hashes a stage's params and deps *after* the stage has run. An edit of params.yaml or of a
dep while the stage runs (say `train.epochs` from 2 to 3, or a save of stages/train.py) would
otherwise be recorded in dvc.lock against outs made from the old values, and `dvc status` would
call them up to date. Both doors (`python -m stages.<name>` and the flow) run a stage inside
`watching_inputs`: it notes the params the stage was given and a fingerprint of each dep that
dvc.yaml lists, and every atomic write of one of the stage's outs (stages/artifacts.py) first
checks them again. A change fails the stage, naming what changed, and no out is replaced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from stages.config import PARAMS_FILE, Params, ParamsError, load_params
from stages.errors import StageError

DVC_YAML = Path("dvc.yaml")
# A dep file up to this size is fingerprinted by content (code, params, records); a larger one
# (the data) by size, mtime and inode, which any write changes.
HASHED_UP_TO = 1 << 20


class InputsChanged(StageError):
    """A param or dep the stage read changed while it ran."""


@dataclass(frozen=True)
class StageSpec:
    """A stage's params keys (None: the whole file), deps and outs, as dvc.yaml lists them."""

    name: str
    param_keys: tuple[str, ...] | None
    deps: tuple[Path, ...]
    outs: tuple[Path, ...]


def _paths(entries: list[Any] | None) -> tuple[Path, ...]:
    # An entry is a path, or a one-key mapping from the path to its options.
    return tuple(Path(next(iter(e)) if isinstance(e, dict) else e) for e in entries or [])


def read_spec(name: str, dvc_yaml: Path = DVC_YAML) -> StageSpec | None:
    """The stage's entry in dvc.yaml; None where there is no dvc.yaml or no such stage."""
    try:
        stage = (YAML(typ="safe").load(dvc_yaml.read_text()) or {}).get("stages", {}).get(name)
    except FileNotFoundError:
        return None
    if not isinstance(stage, dict):
        return None
    keys: list[str] | None = []
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry.split(".")[0])
        elif str(PARAMS_FILE) in entry:  # `- params.yaml:` tracks the file; with keys, those
            listed = entry[str(PARAMS_FILE)]
            keys = None if listed is None or keys is None else keys + list(listed)
    outs = sum((_paths(stage.get(kind)) for kind in ("outs", "metrics", "plots")), ())
    return StageSpec(name, None if keys is None else tuple(keys), _paths(stage.get("deps")), outs)


def _fingerprint(path: Path) -> Any:
    if path.is_dir():
        return {str(p.relative_to(path)): _fingerprint(p) for p in sorted(path.rglob("*"))}
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if info.st_size <= HASHED_UP_TO:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return (info.st_size, info.st_mtime_ns, info.st_ino)


def _sections(params: Params, keys: tuple[str, ...] | None) -> dict[str, Any]:
    dumped = params.model_dump(mode="json")
    return {key: dumped.get(key) for key in (sorted(dumped) if keys is None else keys)}


@dataclass
class Watch:
    spec: StageSpec
    params_path: Path
    used: dict[str, Any]  # the params sections the stage was given
    deps: dict[Path, Any]

    def is_out(self, path: Path) -> bool:
        """Whether writing `path` replaces one of the stage's outs (or a folder holding one)."""
        path = Path(path).absolute()
        for out in self.spec.outs:
            out = out.absolute()
            if path == out or out in path.parents or path in out.parents:
                return True
        return False

    def changes(self) -> list[str]:
        changed = [str(dep) for dep, seen in self.deps.items() if _fingerprint(dep) != seen]
        try:
            now = _sections(load_params(self.params_path), self.spec.param_keys)
        except ParamsError as exc:
            return [*changed, f"{self.params_path} (now invalid: {exc})"]
        for key, value in self.used.items():
            if now.get(key) != value:
                changed.append(_describe_change(key, value, now.get(key)))
        return changed

    def require_unchanged(self) -> None:
        changed = self.changes()
        if changed:
            raise InputsChanged(
                f"changed while the stage ran: {'; '.join(changed)}. No out was replaced, and "
                "dvc.lock does not record this run; run it again"
            )


def _describe_change(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
        return ", ".join(f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
    return f"{key} {old!r} -> {new!r}"


def require_outs_inside(spec: StageSpec, root: Path) -> None:
    """Fails before any work if an out resolves outside the project (a symlinked `models/`):
    DVC would refuse to record it only after the stage had run."""
    project = root.resolve()
    for out in spec.outs:
        resolved = (root / out).resolve()
        if resolved.is_relative_to(project):
            continue
        link = next((p for p in [*reversed(out.parents), out] if (root / p).is_symlink()), out)
        raise StageError(
            f"{out}: resolves to {resolved}, outside the project {project} ({link} is a "
            f"symlink); DVC records no out outside the project, so the run would be lost: make "
            f"{link} a folder inside the project (a DVC cache elsewhere is `dvc cache dir`)"
        )


_current: ContextVar[Watch | None] = ContextVar("stage_inputs", default=None)


@contextmanager
def watching_inputs(name: str, params: Params, params_path: Path = PARAMS_FILE) -> Iterator[None]:
    """Within the block, writing one of stage `name`'s outs first checks its inputs again.

    Paths are relative to the current folder (the repo root, where DVC runs a stage). Without a
    dvc.yaml entry for the stage (a stage run by hand elsewhere) nothing is watched.
    """
    root = Path(params_path).parent
    spec = read_spec(name, root / DVC_YAML)
    if spec is None:
        yield
        return
    require_outs_inside(spec, root)
    watch = Watch(
        spec,
        Path(params_path),
        _sections(params, spec.param_keys),
        {dep: _fingerprint(dep) for dep in spec.deps},
    )
    token = _current.set(watch)
    try:
        yield
    finally:
        _current.reset(token)


def before_replacing(dest: Path) -> None:
    """Called by every atomic write just before it renames onto `dest`."""
    watch = _current.get()
    if watch is not None and watch.is_out(dest):
        watch.require_unchanged()
