"""A stage that fails puts back the outs DVC removed before running it.

No out in dvc.yaml is `persist: true`, since that turns DVC's run-cache off. So DVC removes a
stage's outs before its command runs, as it does in any DVC project; dvc.lock still names them
and .dvc/cache still holds them. If the stage then fails or is stopped, `restoring_outs` checks
them out again, with DVC's own checkout, as dvc.lock records them: the workspace is as it was
before the run, and `dvc status` is clean. A SIGKILL cannot be caught; after one, `dvc checkout`
(or the next `dvc repro`, from the run-cache) puts the outs back.

Only a stage that DVC runs (DVC_ROOT set, by `dvc repro` or the flow) restores anything: run by
hand, a stage never had its outs removed, and its atomic writes leave them as they were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dvc.stage import Stage

log = logging.getLogger("stages.outs")


def restore_outs(stage: Stage) -> None:
    """Checks out each of `stage`'s outs that dvc.lock records, logging what it could not;
    never raises, since the stage has already failed and says why."""
    from dvc.exceptions import DvcException

    missing = []
    for out in stage.outs:
        if not out.use_cache or not out.hash_info:  # never recorded, or not DVC's to restore
            continue
        try:
            out.checkout(force=True)
        except (DvcException, OSError) as exc:  # a missing cache object is a FileNotFoundError
            log.debug("could not restore %s: %s", out, exc)
            missing.append(str(out))
    if missing:
        log.warning(
            "%s: %s not in the DVC cache, so not put back: `dvc pull` or `dvc repro` brings "
            "them back",
            stage.name,
            ", ".join(missing),
        )
    else:
        log.info("%s: its outs are back as dvc.lock records them", stage.name)


def restore_outs_of(name: str, root: Path) -> None:
    """`restore_outs` for the dvc.yaml stage `name` of the project at `root`."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            restore_outs(repo.stage.load_one(str(root / "dvc.yaml"), name))
    except DvcException as exc:
        log.warning("%s: could not put back its outs (%s); `dvc checkout` does", name, exc)


@contextmanager
def restoring_outs(name: str) -> Iterator[None]:
    """Runs the block; if it raises (an error, a signal), puts the stage's outs back first."""
    root = os.environ.get("DVC_ROOT")
    try:
        yield
    except BaseException:
        if root is not None:
            restore_outs_of(name, Path(root))
        raise
