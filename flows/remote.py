"""The flow's `--pull` and `--push`: DVC's own pull and push, against the default remote.

`--pull` is `dvc pull --allow-missing --run-cache` before the run: a fresh clone takes every out
the remote has, and DVC then runs only the stages whose outs it lacks. `--push` is
`dvc push --run-cache` after the run, so another machine can pull what this one made (and skip
params it ran, through the run-cache). Errors name the remote and its URL, and the DVC command
that sets one up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvc.config import NoRemoteError
from dvc.repo import Repo

from stages.errors import StageError

log = logging.getLogger("flows.remote")
SETUP_HINT = (
    "set one up with `dvc remote add -d <name> <url>` (a folder, s3://bucket/path, "
    'ssh://host/path; README "Sharing data and models")'
)


class RemoteError(StageError):
    """No remote, an unreachable one, or one that refused a transfer."""


@dataclass
class Transfer:
    """What a pull or a push did, for the run summary."""

    remote: str
    url: str
    files: int = 0
    missing: list[str] = field(default_factory=list)  # outs the remote did not have (pull)

    def describe(self, verb: str) -> str:
        line = f"{verb} {self.files} file(s), remote `{self.remote}` ({self.url})"
        if self.missing:
            line += f"; not on the remote, so rerun: {', '.join(self.missing)}"
        return line


def default_remote(repo: Repo) -> tuple[str, str]:
    """The default remote's name and URL, or RemoteError naming `dvc remote add -d`."""
    name = repo.config["core"].get("remote")
    remotes: dict[str, Any] = repo.config.get("remote", {})
    if not name or name not in remotes:
        raise RemoteError(f"no default DVC remote in {repo.root_dir}: {SETUP_HINT}")
    return name, str(remotes[name].get("url", "?"))


def require_remote(root: Path) -> None:
    """Fails, naming `dvc remote add -d`, unless the project has a default remote."""
    with Repo(str(root)) as repo:
        default_remote(repo)


def _failed(action: str, name: str, url: str, exc: BaseException) -> RemoteError:
    return RemoteError(
        f"{action} remote `{name}` ({url}) failed: {exc}; check it with `dvc remote list` "
        "and `dvc status -c` (its timeouts are `dvc remote modify` options)"
    )


def missing_outs(root: Path) -> list[str]:
    """The outs dvc.lock records that are not in the workspace."""
    with Repo(str(root)) as repo:
        return sorted(
            str(out)
            for stage in repo.index.stages
            for out in stage.outs
            if out.use_cache and out.hash_info and not out.exists
        )


def pull(root: Path) -> Transfer:
    """`dvc pull --allow-missing --run-cache`; names the outs the remote lacks."""
    with Repo(str(root)) as repo:
        name, url = default_remote(repo)
        transfer = Transfer(name, url)
        try:
            stats = repo.pull(run_cache=True, allow_missing=True)
        except NoRemoteError as exc:
            raise RemoteError(f"{exc}; {SETUP_HINT}") from exc
        except Exception as exc:  # noqa: BLE001 - botocore, ssh, OS errors: all name the remote
            raise _failed("pulling from", name, url, exc) from exc
        transfer.files = int(stats.get("stats", {}).get("fetched", 0))
    transfer.missing = missing_outs(root)
    for out in transfer.missing:
        log.warning("remote `%s` lacks %s: the stage that makes it runs", name, out)
    return transfer


def push(root: Path) -> Transfer:
    """`dvc push --run-cache`: every out dvc.lock records, and the run-cache entries."""
    with Repo(str(root)) as repo:
        name, url = default_remote(repo)
        try:
            files = repo.push(run_cache=True)
        except NoRemoteError as exc:
            raise RemoteError(f"{exc}; {SETUP_HINT}") from exc
        except Exception as exc:  # noqa: BLE001
            raise _failed("pushing to", name, url, exc) from exc
    return Transfer(name, url, files=int(files))
