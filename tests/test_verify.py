"""`python -m stages.verify`: rehashes every out and cache object, trusting no mtime (issue 10).

Unit tests run it on a tiny DVC project (two stages, a file, a folder with a subfolder and a
.dvcignore'd file, a model card); one end-to-end test reproduces the issue on the real pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages import verify

from .helpers.cache import cache_object, corrupt_keeping_stat, lock_md5
from .helpers.tools import REPO, dvc, run, tool_env

UP_TO_DATE = "Data and pipelines are up to date."

MAKE_PY = """\
import hashlib, json, sys
from pathlib import Path

if sys.argv[1] == "data":
    Path("out.txt").write_text("hello\\n")
    Path("d/sub").mkdir(parents=True, exist_ok=True)
    Path("d/a.txt").write_text("a\\n")
    Path("d/sub/b.txt").write_text("b\\n")
    Path("d/debug.log").write_text("left out by .dvcignore\\n")
else:
    Path("models").mkdir(exist_ok=True)
    files = {"model_weights.pth": b"weights" * 100, "model.safetensors": b"tensors" * 100}
    for name, data in files.items():
        Path("models", name).write_bytes(data)
    card = {"files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    Path("models/model_card.json").write_text(json.dumps(card))
"""

DVC_YAML = """\
stages:
  data:
    cmd: python make.py data
    deps: [make.py]
    outs: [out.txt, d]
  export:
    cmd: python make.py export
    deps: [make.py, out.txt]
    outs: [models/model_weights.pth, models/model.safetensors, models/model_card.json]
"""


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC project after `dvc repro`, built once for this module; tests change copies."""
    repo = tmp_path_factory.mktemp("tiny") / "repo"
    repo.mkdir()
    (repo / "make.py").write_text(MAKE_PY)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".dvcignore").write_text("*.log\n")
    run(["git", "init", "-q"], repo, tool_env())
    dvc(repo, "init", "-q")
    dvc(repo, "repro")
    return repo


@pytest.fixture
def project(tiny_project: Path, tmp_path: Path) -> Path:
    # A new path: DVC's state database, kept per project path, starts empty for each copy.
    return Path(shutil.copytree(tiny_project, tmp_path / "repo", symlinks=True))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def run_verify(
    repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """`python -m stages.verify ARGS` in repo, in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(repo)
    capsys.readouterr()
    code = verify.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def fixes(output: str) -> list[str]:
    """The fix each problem line gives, in order."""
    return re.findall(r"; fix: (.+)$", output, flags=re.MULTILINE)


def apply_fix(repo: Path, fix: str) -> None:
    """Runs a printed fix, as a user would paste it."""
    run(["bash", "-c", fix], repo, tool_env())


def test_a_clean_project_verifies_with_exit_0(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_verify(project, capsys, monkeypatch)
    assert code == 0, out + err
    assert out.splitlines() == [
        # data: out.txt and d (its .dir object and its two files, not the ignored debug.log)
        "ok    data: 2 outs match dvc.lock; 4 cache objects intact",
        "ok    export: 3 outs match dvc.lock; 3 cache objects intact",
        "ok    model card: 2 files match models/model_card.json's sha256",
        "verify: every out matches dvc.lock",
    ]


def test_folder_hashes_are_dvcs_own(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """hash_dir gives the md5 that DVC wrote in dvc.lock, and the files its .dir object lists."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        verifier = verify.Verifier(repo, check_cache=True, bar=verify.tqdm(disable=True))
        oid, files = verifier.hash_dir(project / "d", "md5")
    assert oid == lock_md5(project, "d")
    manifest = json.loads(cache_object(project, oid).read_text())
    assert files == {entry["relpath"]: entry["md5"] for entry in manifest}
    assert set(files) == {"a.txt", "sub/b.txt"}  # debug.log is .dvcignore'd


def test_a_changed_file_with_a_good_cache_object_is_fixed_by_checkout(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "out.txt").write_text("edited\n")
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    assert "FAIL  data: 1 of 2 outs differ from dvc.lock; 0 of 4 cache objects corrupted" in out
    assert (
        f"FAIL  out.txt: dvc.lock says md5 {lock_md5(project, 'out.txt')}, the file hashes to "
        f"md5 {md5(b'edited' + bytes([10]))}; fix: dvc checkout --force out.txt\n"
    ) in out
    assert out.endswith("verify: 1 problem; after the fixes, run `python -m stages.verify` again\n")
    apply_fix(project, fixes(out)[0])
    assert run_verify(project, capsys, monkeypatch)[0] == 0


def test_a_changed_folder_names_the_files_that_differ(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "d/sub/b.txt").write_text("B\n")
    (project / "d/a.txt").unlink()
    (project / "d/new.txt").write_text("new\n")
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    assert f"FAIL  d: dvc.lock says md5 {lock_md5(project, 'd')}, the folder hashes to md5 " in out
    assert (
        ".dir (changed sub/b.txt, missing a.txt, not in dvc.lock new.txt); "
        "fix: dvc checkout --force d\n"
    ) in out
    apply_fix(project, fixes(out)[0])
    assert run_verify(project, capsys, monkeypatch)[0] == 0


def test_a_missing_out_is_named_with_its_fix(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "models/model.safetensors").unlink()
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    expected = lock_md5(project, "models/model.safetensors")
    assert (
        f"FAIL  models/model.safetensors: missing (dvc.lock says md5 {expected}); "
        "fix: dvc checkout models/model.safetensors\n"
    ) in out
    # The card's claim about the same file: one more line, pointing at the first.
    assert "FAIL  models/model.safetensors: missing (models/model_card.json says sha256" in out
    apply_fix(project, fixes(out)[0])
    assert run_verify(project, capsys, monkeypatch)[0] == 0


def test_a_folder_where_dvc_lock_has_a_file_is_named(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "out.txt").unlink()
    (project / "out.txt").mkdir()
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    assert (
        f"FAIL  out.txt: dvc.lock says md5 {lock_md5(project, 'out.txt')} (a file), found a "
        "folder; fix: dvc checkout --force out.txt\n"
    ) in out
    apply_fix(project, fixes(out)[0])
    assert run_verify(project, capsys, monkeypatch)[0] == 0


def test_a_cache_object_corrupted_with_its_mtime_kept_is_caught(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue on the tiny project: DVC restores the corrupted bytes and calls them current."""
    named = lock_md5(project, "out.txt")
    obj = cache_object(project, named)
    bad = corrupt_keeping_stat(obj)
    (project / "out.txt").unlink()
    dvc(project, "checkout", "--force")
    assert (project / "out.txt").read_bytes() == bad
    assert UP_TO_DATE in dvc(project, "status").stdout  # DVC's blind spot

    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    rel = obj.relative_to(project)
    fix = f"rm -f {rel} && dvc repro --force -s data"
    assert (
        f"FAIL  out.txt: dvc.lock says md5 {named}, the file hashes to md5 {md5(bad)}; "
        f"its cache object is corrupted too; fix: {fix}\n"
    ) in out
    assert (
        f"FAIL  {rel}: corrupted cache object of out.txt: named md5 {named}, "
        f"hashes to md5 {md5(bad)}; fix: {fix}\n"
    ) in out
    apply_fix(project, fix)
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 0, out


def test_a_corrupted_object_of_a_file_in_a_folder_is_named(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    obj = cache_object(project, md5(b"b\n"))
    corrupt_keeping_stat(obj)
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    assert "FAIL  data: 0 of 2 outs differ from dvc.lock; 1 of 4 cache objects corrupted" in out
    assert f"FAIL  {obj.relative_to(project)}: corrupted cache object of d/sub/b.txt: " in out


def test_a_corrupted_folder_manifest_is_caught_and_its_files_still_checked(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    named = lock_md5(project, "d")
    corrupt_keeping_stat(cache_object(project, named))
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    # The workspace folder matches dvc.lock, so it names the file objects in the manifest's stead.
    assert "FAIL  data: 0 of 2 outs differ from dvc.lock; 1 of 4 cache objects corrupted" in out
    assert f"corrupted cache object of d: named md5 {named.removesuffix('.dir')}, " in out


def test_missing_cache_objects_warn_without_failing(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after `dvc gc` or in a fresh clone: nothing to check there, and nothing wrong."""
    shutil.rmtree(project / ".dvc" / "cache")
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 0, out
    assert "ok    data: 2 outs match dvc.lock; 0 cache objects intact, 4 missing" in out
    assert "warn  data: 4 cache objects missing (such as .dvc/cache/files/md5/" in out
    assert out.endswith("verify: every out matches dvc.lock (2 warnings)\n")


def test_no_cache_checks_the_workspace_only(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt_keeping_stat(cache_object(project, lock_md5(project, "out.txt")))
    code, out, _ = run_verify(project, capsys, monkeypatch, "--no-cache")
    assert code == 0, out
    assert "ok    data: 2 outs match dvc.lock\n" in out and "cache" not in out
    (project / "out.txt").write_text("edited\n")
    code, out, _ = run_verify(project, capsys, monkeypatch, "--no-cache")
    assert code == 1
    assert "fix: dvc checkout --force out.txt, if its cache object is good" in out


def test_a_model_card_that_disagrees_with_its_files_is_caught(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card matches dvc.lock (committed after the edit), yet its sha256 is wrong."""
    card_path = project / "models/model_card.json"
    card = json.loads(card_path.read_text())
    card["files"]["model_weights.pth"] = "0" * 64
    card_path.write_text(json.dumps(card))
    dvc(project, "commit", "--force", "export")
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    actual = hashlib.sha256((project / "models/model_weights.pth").read_bytes()).hexdigest()
    assert "FAIL  model card: 1 of 2 files differ from models/model_card.json" in out
    assert (
        f"FAIL  models/model_weights.pth: models/model_card.json says sha256 {'0' * 64}, the "
        f"file hashes to sha256 {actual}; models/model_card.json disagrees with the file "
        "dvc.lock records; fix: dvc repro --force -s export\n"
    ) in out
    apply_fix(project, fixes(out)[0])
    assert run_verify(project, capsys, monkeypatch)[0] == 0


def test_stage_records_are_checked_only_when_present(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stages/records.py's records ("outputs": sha256 by name of the files beside the record),
    found beside an out."""
    assert "record" not in run_verify(project, capsys, monkeypatch)[1]
    weights = "models/model_weights.pth"
    sha256 = hashlib.sha256((project / weights).read_bytes()).hexdigest()
    beside = project / "models/record.json"
    beside.write_text(json.dumps({"stage": "export", "outputs": {"model_weights.pth": sha256}}))
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 0, out
    assert "ok    export record: 1 file matches models/record.json's sha256\n" in out

    beside.write_text(json.dumps({"stage": "export", "outputs": {"model_weights.pth": "f" * 64}}))
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    assert (
        f"FAIL  {weights}: models/record.json says sha256 {'f' * 64}, the file hashes to sha256 "
        f"{sha256}; models/record.json disagrees with the file dvc.lock records; "
        "fix: dvc repro --force -s export\n"
    ) in out
    beside.write_text("{}")
    code, out, _ = run_verify(project, capsys, monkeypatch)
    assert code == 1
    assert "FAIL  models/record.json: unreadable\n" in out


def test_the_record_file_name_is_the_stages_own() -> None:
    from stages import records  # imports torch, so verify names the file itself

    assert verify.RECORD_FILE == records.RECORD_FILE


def test_without_dvc_lock_it_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_verify(tmp_path, capsys, monkeypatch)
    assert (code, out, err) == (2, "", "error: verify: dvc.lock: missing; run dvc repro first\n")


def test_outside_a_dvc_project_it_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    code, _, err = run_verify(tmp_path, capsys, monkeypatch)
    assert code == 2
    assert err == f"error: verify: {tmp_path}: not a DVC project (no .dvc/ here)\n"


def test_help_answers_before_dvc_loads() -> None:
    result = run(
        [sys.executable, "-X", "importtime", "-m", "stages.verify", "--help"],
        REPO,
        tool_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: python -m stages.verify [-h] [--no-cache]")
    assert "\npython -m stages.verify [--no-cache]\n" in result.stdout  # the docstring
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    heavy = {"dvc", "dvc_data", "torch", "prefect", "pydantic"}
    assert not imported & heavy, f"--help imported {imported & heavy}"


@pytest.mark.e2e
@pytest.mark.slow
def test_verify_catches_the_corrupted_weights_that_dvc_status_misses(pipeline_copy: Path) -> None:
    """Issue 10: a cache object corrupted with its size and mtime kept. `dvc checkout` restores
    the corrupted weights and `dvc status` calls them up to date; verify names both."""
    repo = pipeline_copy

    def verify_cli() -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "stages.verify"], repo, tool_env(), check=False)

    clean = verify_cli()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.endswith("verify: every out matches dvc.lock\n")

    weights = ["models/train/model_weights.pth", "models/model_weights.pth"]
    named = lock_md5(repo, weights[0])
    assert lock_md5(repo, weights[1]) == named  # export copies train's weights: one object
    obj = cache_object(repo, named)
    bad = corrupt_keeping_stat(obj)
    for path in weights:
        (repo / path).unlink()
    dvc(repo, "checkout", "--force")
    for path in weights:
        assert (repo / path).read_bytes() == bad, f"{path}: dvc checkout restored other bytes"
    status = dvc(repo, "status")
    assert UP_TO_DATE in status.stdout, status.stdout  # the blind spot the issue reports
    assert "Data and pipelines are up to date" in dvc(repo, "repro").stdout

    result = verify_cli()
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    rel = obj.relative_to(repo)
    fix = f"rm -f {rel} && dvc repro --force -s train export"  # in pipeline order
    for path in weights:
        assert (
            f"FAIL  {path}: dvc.lock says md5 {named}, the file hashes to md5 {md5(bad)}; "
            f"its cache object is corrupted too; fix: {fix}\n"
        ) in out
    assert (
        f"FAIL  {rel}: corrupted cache object of {', '.join(sorted(weights))}: "
        f"named md5 {named}, hashes to md5 {md5(bad)}; fix: {fix}\n"
    ) in out
    # Counts of outs and objects left open: dvc.yaml may give train more outs (its record).
    summary = r"^FAIL  train: 1 of \d+ outs differ from dvc.lock; 1 of \d+ cache objects corrupted$"
    assert re.search(summary, out, flags=re.MULTILINE), out
    assert "FAIL  models/model_weights.pth: models/model_card.json says sha256" in out
    print(textwrap.indent(out, "  "))

    apply_fix(repo, fix)  # the printed fix, pasted as a user would
    fixed = verify_cli()
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
