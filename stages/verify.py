"""python -m stages.verify [--no-cache]

Rehashes every out that dvc.lock records, reading each file in full, and compares it with
dvc.lock. Rehashes each out's objects in the DVC cache (.dvc/cache) and checks that each still
hashes to its name. Checks the sha256s that models/model_card.json gives for the model files, and
those in each stage record (record.json beside a stage's outs, such as models/train/record.json)
that exists. Run it from the project root.

Exit 0: everything matches. A missing cache object (after `dvc gc`, or in a fresh clone) is only
a warning. Exit 1: something differs; each problem is named with its fix. Exit 2: no dvc.lock, or
not a DVC project.

Why: `dvc status`, `dvc repro` and `dvc checkout` trust DVC's state database, which remembers a
file's hash by its inode, mtime and size. A cache object corrupted with its mtime kept is never
rehashed: `dvc checkout` copies the corrupted bytes into the workspace, and `dvc status` calls
them up to date. This command never reads that database.
"""

# The command line is parsed before the imports below (DVC takes a second), as in stages/train.py,
# but here parse_args is defined in this module, which E402 would flag.
# ruff: noqa: E402

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, standard library only, so that `--help` answers before DVC loads."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.verify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="check the workspace outs and the model card only, not the objects in .dvc/cache",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad argument answer before DVC loads
    ARGS = parse_args()

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dvc_data.hashfile.hash import file_md5
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.tree import Tree
from fsspec.callbacks import Callback
from ruamel.yaml import YAML
from ruamel.yaml import YAMLError as YAML12Error
from tqdm import tqdm

from stages.config import EXPORT_DIR

if TYPE_CHECKING:
    from dvc.repo import Repo

LOCK_FILE = Path("dvc.lock")
MODEL_CARD = EXPORT_DIR / "model_card.json"
# Stage records: the sha256 of each out a stage wrote, beside those outs. The same name as
# stages.records.RECORD_FILE, which is not imported: that module loads torch.
RECORD_FILE = "record.json"
# An out without `hash:` in dvc.lock is a DVC 2 out: its md5 is of the text with CRLF made LF.
LEGACY_HASH = "md5-dos2unix"
# A folder that differs from dvc.lock names at most this many of its files.
MAX_LISTED = 10


class UsageError(Exception):
    """Nothing can be checked: printed as `error: verify: <message>`, with exit code 2."""


@dataclass(frozen=True)
class Out:
    """One out as dvc.lock records it."""

    stage: str
    path: str  # relative to the project root, as dvc.lock writes it
    hash_name: str  # md5, or md5-dos2unix for a DVC 2 out
    oid: str  # the md5; a folder's ends in .dir
    size: int

    @property
    def is_dir(self) -> bool:
        return HashInfo(self.hash_name, self.oid).isdir


@dataclass
class CacheObject:
    """One object in the DVC cache, hashed once however many outs use it."""

    path: Path
    oid: str
    hash_name: str
    users: dict[str, str] = field(default_factory=dict)  # out (or file in a folder out) -> stage
    now: str | None = None  # what its bytes hash to; None while missing
    missing: bool = False
    corrupt: bool = False


@dataclass
class Report:
    summary: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_lock(root: Path) -> tuple[list[str], list[Out]]:
    """dvc.lock's stages, in its order, and every out of each, read as DVC reads it (YAML 1.2)."""
    path = root / LOCK_FILE
    if not path.is_file():
        raise UsageError(f"{LOCK_FILE}: missing; run dvc repro first")
    try:
        lock = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAML12Error) as exc:
        raise UsageError(f"{LOCK_FILE}: unreadable ({exc}); restore it with git") from None
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict) or lock.get("schema") != "2.0":
        raise UsageError(f"{LOCK_FILE}: expected DVC's schema 2.0 with a stages map; restore it")
    outs = []
    for stage, entry in stages.items():
        for out in (entry or {}).get("outs") or []:
            if not (isinstance(out, dict) and isinstance(out.get("path"), str)):
                raise UsageError(f"{LOCK_FILE}: stage {stage}: an out without a path; restore it")
            if not isinstance(out.get("md5"), str):
                raise UsageError(f"{LOCK_FILE}: {out['path']}: no md5 recorded; restore it")
            size = out.get("size")
            outs.append(
                Out(
                    str(stage),
                    out["path"],
                    out.get("hash", LEGACY_HASH),
                    out["md5"],
                    size if isinstance(size, int) else 0,
                )
            )
    return [str(stage) for stage in stages], outs


class _Progress(Callback):
    """Feeds the bytes that dvc_data hashes into one tqdm bar."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar

    def relative_update(self, inc: int = 1) -> None:
        self.bar.update(inc)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class Verifier:
    """Checks one project's outs; the findings collect in `report`."""

    def __init__(self, repo: Repo, check_cache: bool, bar: tqdm) -> None:
        self.repo = repo
        self.root = Path(repo.root_dir)
        self.fs = repo.fs
        # A folder out's hash leaves out what .dvcignore lists, as DVC's does.
        self.ignore = repo.dvcignore
        # DVC 3 outs' objects live under files/md5/, DVC 2 ones at the cache's top.
        self.cache_dirs = {
            "md5": Path(repo.cache.local.path),
            LEGACY_HASH: Path(repo.cache.legacy.path),
        }
        self.check_cache = check_cache
        self.progress = _Progress(bar)
        self.hashes: dict[tuple[Path, str], str] = {}
        self.objects: dict[Path, CacheObject] = {}
        self.bad_outs: set[str] = set()
        self.report = Report()
        # Outs that differ, with their cache objects: their fixes are written once every out is
        # checked, when each object knows all the stages that share it.
        self.bad: list[tuple[str, Out, list[CacheObject], bool]] = []

    def show(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    # Hashing reads every byte, never DVC's state database, and each file once.

    def hash(self, path: Path, name: str = "md5") -> str:
        key = (path, name)
        if key not in self.hashes:
            self.hashes[key] = file_md5(str(path), callback=self.progress, name=name)
        return self.hashes[key]

    def hash_dir(self, path: Path, name: str) -> tuple[str, dict[str, str]]:
        """A folder's hash as DVC computes it (dvc_data's Tree.digest: the md5 of the JSON list of
        its files' relpaths and md5s, plus ".dir"), and its files' md5s by relpath."""
        files: dict[str, str] = {}
        for top, _, names in self.ignore.walk(self.fs, str(path)):
            rel = Path(top).relative_to(path)
            for fname in names:
                files[(rel / fname).as_posix()] = self.hash(Path(top) / fname, name)
        tree = Tree()
        for rel, md5 in files.items():
            tree.add(tuple(rel.split("/")), None, HashInfo(name, md5))
        tree.digest()  # plain md5, as dvc_data's build does whatever the files' hash name
        return tree.oid, files

    # The cache

    def cache_object(self, oid: str, name: str, user: str, stage: str) -> CacheObject:
        path = self.cache_dirs[name] / oid[:2] / oid[2:]
        obj = self.objects.setdefault(path, CacheObject(path, oid, name))
        obj.users.setdefault(user, stage)
        if obj.now is None and not obj.missing:
            if path.is_file():
                # A .dir object is named after the md5 of its own bytes, plus ".dir".
                obj.now = self.hash(path, name)
                obj.corrupt = obj.now != oid.removesuffix(".dir")
            else:
                obj.missing = True
        return obj

    @staticmethod
    def manifest(obj: CacheObject) -> dict[str, str] | None:
        """A folder's files and md5s from its .dir object; None if that is missing or corrupt."""
        if obj.missing or obj.corrupt:
            return None
        try:
            entries = json.loads(obj.path.read_text(encoding="utf-8"))
            return {entry["relpath"]: entry["md5"] for entry in entries}
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            obj.corrupt = True  # it hashes to its name, yet is no manifest
            return None

    # The checks

    def check_out(self, out: Out) -> list[CacheObject]:
        """Compares the workspace out with dvc.lock (a failure if it differs); returns the cache
        objects it uses, checked."""
        where = self.root / out.path
        objects: list[CacheObject] = []
        listing = None
        if self.check_cache:
            top = self.cache_object(out.oid, out.hash_name, out.path, out.stage)
            objects.append(top)
            listing = self.manifest(top) if out.is_dir else None
        files = None
        kind = "folder" if out.is_dir else "file"
        if not where.exists():
            now = None
        elif out.is_dir != where.is_dir():
            now = "folder" if where.is_dir() else "file"  # the other kind: no hash to compare
        elif out.is_dir:
            now, files = self.hash_dir(where, out.hash_name)
        else:
            now = self.hash(where, out.hash_name)
        if out.is_dir and self.check_cache:
            # A workspace folder that matches dvc.lock lists the same files as its .dir object,
            # so it names the file objects to check when that object is missing or corrupt.
            if listing is None and now == out.oid:
                listing = files
            for rel, md5 in sorted((listing or {}).items()):
                user = f"{out.path}/{rel}"
                objects.append(self.cache_object(md5, out.hash_name, user, out.stage))
        if now == out.oid:
            return objects
        self.bad_outs.add(out.path)
        said = f"dvc.lock says {out.hash_name} {out.oid}"
        if now is None:
            text = f"{out.path}: missing ({said})"
        elif now in ("file", "folder"):
            text = f"{out.path}: {said} (a {kind}), found a {now}"
        else:
            text = f"{out.path}: {said}, the {kind} hashes to {out.hash_name} {now}"
            if files is not None and listing is not None:
                text += f" ({differences(listing, files)})"
        self.bad.append((text, out, objects, now is None))
        return objects

    def workspace_fix(self, out: Out, objects: list[CacheObject], missing: bool) -> str:
        corrupt = [obj for obj in objects if obj.corrupt]
        if corrupt:
            return f"its cache object is corrupted too; fix: {self.rebuild(corrupt)}"
        if not self.check_cache:
            return (
                f"fix: dvc checkout --force {out.path}, if its cache object is good "
                "(run without --no-cache to check)"
            )
        if any(obj.missing for obj in objects):
            return f"its cache object is missing; fix: dvc repro --force -s {out.stage}"
        return f"fix: dvc checkout {'' if missing else '--force '}{out.path}"

    @cached_property
    def pipeline_order(self) -> dict[str, int]:
        """Each stage's place in the pipeline: `dvc repro -s a b` runs a, then b, as given."""
        import networkx as nx

        try:
            # DVC's graph points from a stage to the stages it depends on: post-order puts each
            # stage after them, as `dvc repro` runs them.
            stages = nx.dfs_postorder_nodes(self.repo.index.graph)
            return {stage.addressing: i for i, stage in enumerate(stages)}
        except Exception:  # noqa: BLE001 - a dvc.yaml DVC cannot load: fall back to names
            return {}

    def rebuild(self, objects: Iterable[CacheObject]) -> str:
        """The fix for corrupted cache objects: delete them, rerun the stages that out them."""
        objects = list(objects)
        paths = " ".join(sorted({self.show(obj.path) for obj in objects}))
        order = self.pipeline_order
        stages = {stage for obj in objects for stage in obj.users.values()}
        stages = sorted(stages, key=lambda stage: (order.get(stage, len(order)), stage))
        return f"rm -f {paths} && dvc repro --force -s {' '.join(stages)}"

    def check_stage(self, stage: str, outs: list[Out]) -> None:
        if not outs:
            self.report.summary.append(f"ok    {stage}: no outs")
            return
        objects: dict[Path, CacheObject] = {}
        for out in outs:
            objects.update((obj.path, obj) for obj in self.check_out(out))
        bad = sum(out.path in self.bad_outs for out in outs)
        corrupt = sum(obj.corrupt for obj in objects.values())
        missing = [obj for obj in objects.values() if obj.missing]
        if bad or corrupt:
            line = f"FAIL  {stage}: {bad} of {plural(len(outs), 'out')} differ from dvc.lock"
            if self.check_cache:
                line += f"; {corrupt} of {plural(len(objects), 'cache object')} corrupted"
        else:
            matches = "matches" if len(outs) == 1 else "match"
            line = f"ok    {stage}: {plural(len(outs), 'out')} {matches} dvc.lock"
            if self.check_cache:
                intact = len(objects) - len(missing)
                line += f"; {plural(intact, 'cache object')} intact"
        if missing:
            line += f", {len(missing)} missing"
        self.report.summary.append(line)
        if missing:  # one line per stage, not per file: after `dvc gc` a folder's all go
            self.report.warnings.append(
                f"{stage}: {plural(len(missing), 'cache object')} missing (such as "
                f"{self.show(missing[0].path)}, of {next(iter(missing[0].users))}), as after "
                "`dvc gc` or in a fresh clone: not checked"
            )

    def report_outs_and_cache(self) -> None:
        """The failures of the outs and cache objects, with their fixes; after every stage."""
        for text, out, objects, missing in self.bad:
            self.report.failures.append(f"{text}; {self.workspace_fix(out, objects, missing)}")
        for obj in self.objects.values():
            if obj.corrupt:
                self.report.failures.append(
                    f"{self.show(obj.path)}: corrupted cache object of "
                    f"{', '.join(sorted(obj.users))}: named {obj.hash_name} "
                    f"{obj.oid.removesuffix('.dir')}, hashes to {obj.hash_name} {obj.now}; "
                    f"fix: {self.rebuild([obj])}"
                )

    def check_sha256(self, what: str, claims: dict[str, str], source: Path, stage: str) -> None:
        """Compares files (by path from the root) with the sha256s that `source` gives."""
        bad = 0
        for rel, sha256 in sorted(claims.items()):
            path = self.root / rel
            said = f"{source} says sha256 {sha256}"
            if rel in self.bad_outs:
                fix = "fix: as for its dvc.lock line"
            else:
                fix = f"{source} disagrees with the file dvc.lock records; fix: "
                fix += f"dvc repro --force -s {stage}"
            if not path.is_file():
                self.report.failures.append(f"{rel}: missing ({said}); {fix}")
            elif (now := self.hash(path, "sha256")) != sha256:
                self.report.failures.append(
                    f"{rel}: {said}, the file hashes to sha256 {now}; {fix}"
                )
            else:
                continue
            bad += 1
        if bad:
            line = f"FAIL  {what}: {bad} of {plural(len(claims), 'file')} differ from {source}"
        else:
            matches = "matches" if len(claims) == 1 else "match"
            line = f"ok    {what}: {plural(len(claims), 'file')} {matches} {source}'s sha256"
        self.report.summary.append(line)

    def bad_record(self, source: Path, stage: str, expected: str) -> None:
        self.report.summary.append(f"FAIL  {source}: unreadable")
        self.report.failures.append(
            f"{source}: expected {expected}; fix: dvc repro --force -s {stage}"
        )

    def check_card(self, outs: list[Out]) -> None:
        stage = stage_of(outs, MODEL_CARD, "export")
        path = self.root / MODEL_CARD
        if not path.is_file():
            self.report.summary.append(f"skip  model card: {MODEL_CARD} missing")
            return
        try:
            files = json.loads(path.read_text(encoding="utf-8"))["files"]
            claims = {(MODEL_CARD.parent / name).as_posix(): sha for name, sha in files.items()}
            if not all(isinstance(sha, str) for sha in claims.values()):
                raise TypeError
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            self.bad_record(MODEL_CARD, stage, 'JSON with a "files" map of names to sha256s')
            return
        self.check_sha256("model card", claims, MODEL_CARD, stage)

    def check_records(self, outs: list[Out]) -> None:
        """Checks each stage record (stages/records.py) found beside or inside an out."""
        for record, stage in find_records(self.root, outs).items():
            try:
                claims = record_claims(record, json.loads((self.root / record).read_text()))
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
                expected = 'JSON with an "outputs" map of file names to sha256s'
                self.bad_record(record, stage, expected)
                continue
            self.check_sha256(f"{stage} record", claims, record, stage)


def find_records(root: Path, outs: list[Out]) -> dict[Path, str]:
    """Each record.json that exists as an out, inside a folder out or beside a file out (stages
    write them beside their outs, perhaps before dvc.lock lists them), and its stage."""
    found: dict[Path, str] = {}
    for out in outs:
        path = Path(out.path)
        if path.name == RECORD_FILE:
            found[path] = out.stage
        for folder in (path,) if out.is_dir else (path.parent,):
            if (root / folder / RECORD_FILE).is_file():
                found.setdefault(folder / RECORD_FILE, out.stage)
    return found


def record_claims(record: Path, data: Any) -> dict[str, str]:
    """The sha256 a record gives for each file, by path from the root: its "outputs" (names of
    files beside it)."""
    outputs = data["outputs"].items()
    claims = {(record.parent / name).as_posix(): sha for name, sha in outputs}
    if not claims or not all(isinstance(sha, str) for sha in claims.values()):
        raise TypeError("no sha256s")
    return claims


def stage_of(outs: list[Out], path: Path, default: str) -> str:
    """The stage whose out `path` is, by dvc.lock."""
    return next((out.stage for out in outs if out.path == path.as_posix()), default)


def differences(expected: dict[str, str], found: dict[str, str]) -> str:
    """Which files of a folder differ from its manifest; at most MAX_LISTED named."""
    both = sorted(expected.keys() & found.keys())
    named = [f"changed {rel}" for rel in both if expected[rel] != found[rel]]
    named += [f"missing {rel}" for rel in sorted(expected.keys() - found.keys())]
    named += [f"not in dvc.lock {rel}" for rel in sorted(found.keys() - expected.keys())]
    more = f", and {len(named) - MAX_LISTED} more" if len(named) > MAX_LISTED else ""
    return ", ".join(named[:MAX_LISTED]) + more


def verify(root: Path, check_cache: bool = True, stdout: TextIO | None = None) -> int:
    """Checks the project at root (see the module doc); returns the exit code."""
    stdout = stdout or sys.stdout
    try:
        stages, outs = read_lock(root)
    except UsageError as exc:
        print(f"error: verify: {exc}", file=sys.stderr)
        return 2
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        print(f"error: verify: {root}: not a DVC project (no .dvc/ here)", file=sys.stderr)
        return 2
    # An estimate for the bar: each out once, and each cache object once.
    total = sum(out.size for out in outs)
    if check_cache:
        total += sum({out.oid: out.size for out in outs}.values())
    bar = tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=None, leave=False)
    try:
        verifier = Verifier(repo, check_cache, bar)
        for stage in stages:
            verifier.check_stage(stage, [out for out in outs if out.stage == stage])
        verifier.report_outs_and_cache()
        verifier.check_card(outs)
        verifier.check_records(outs)
    finally:
        bar.close()
        repo.close()
    report = verifier.report
    lines = report.summary + [f"FAIL  {line}" for line in report.failures]
    lines += [f"warn  {line}" for line in report.warnings]
    if report.failures:
        lines.append(
            f"verify: {plural(len(report.failures), 'problem')}; after the fixes, "
            "run `python -m stages.verify` again"
        )
    else:
        warned = f" ({plural(len(report.warnings), 'warning')})" if report.warnings else ""
        lines.append(f"verify: every out matches dvc.lock{warned}")
    print("\n".join(lines), file=stdout)
    return 1 if report.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return verify(Path.cwd(), check_cache=not args.no_cache)


if __name__ == "__main__":
    raise SystemExit(verify(Path.cwd(), check_cache=not ARGS.no_cache))
