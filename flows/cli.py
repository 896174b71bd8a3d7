"""The command lines of `python -m flows.pipeline` and `python -m flows.serve`.

Standard library only: each module parses its command line first, before it imports DVC and
Prefect (seconds), so `--help` and a bad argument answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Sequence

DEFAULT_CRON = "0 3 * * *"  # every day at 03:00
BAD_ARGUMENTS = 2  # argparse's exit code, also for arguments found bad after parsing
# How often a run of the flow tells the server it is alive (Prefect's default: 180 s). The
# automation in flows/automations.yaml marks a run Crashed after 90 s of silence; prefect.yaml
# sets the same for the runs its workers start.
HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")


def beat_often() -> None:
    """Before Prefect loads (it reads its settings once): this process's runs beat every 30 s."""
    os.environ.setdefault(*HEARTBEAT_ENV)


def _parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def pipeline_args(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _parser("python -m flows.pipeline", doc)
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="STAGE",
        help="reproduce this stage and what it needs (repeatable)",
    )
    parser.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="wait for a concurrent dvc repro or flow run instead of failing",
    )
    parser.add_argument(
        "--pull",
        action="store_true",
        help="first take the outs the default DVC remote has (dvc pull --allow-missing "
        "--run-cache): only stages whose outs it lacks run",
    )
    parser.add_argument(
        "--push",
        action="store_true",
        help="afterwards upload outs and run-cache to the default DVC remote "
        "(dvc push --run-cache)",
    )
    return parser.parse_args(argv)


def serve_args(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _parser("python -m flows.serve", doc)
    parser.add_argument(
        "--cron", default=DEFAULT_CRON, help='cron schedule (default: "%(default)s", daily 03:00)'
    )
    parser.add_argument("--timezone", default="UTC", help="timezone of the schedule (default: UTC)")
    parser.add_argument(
        "--pull", action="store_true", help="each run first pulls from the default DVC remote"
    )
    parser.add_argument(
        "--push", action="store_true", help="each run pushes what it made to that remote"
    )
    return parser.parse_args(argv)


# An experiment name is a git ref (refs/exps/.../<name>): letters, digits, `_` and `-` are always
# allowed there, and a leading letter keeps it from looking like a commit.
SWEEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,59}")


def sweep_name(text: str) -> str:
    if not SWEEP_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a letter, then up to 59 letters, digits, '_' or '-'"
        )
    return text


def sweep_args(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The sweep's command line; standard library only, so --help answers before DVC loads."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--set",
        action="append",
        dest="settings",
        required=True,
        metavar="SECTION.KEY=V1[,V2...]",
        help="a params.yaml key and its values, as for `dvc exp run -S` (repeatable; "
        "every combination of all --set values runs)",
    )
    parser.add_argument(
        "--name",
        type=sweep_name,
        default=None,
        help="the sweep's name: experiments are NAME-1, NAME-2, ... and the leaderboard is "
        "sweeps/NAME.csv (default: sweep-YYYYMMDD-HHMMSS, in UTC)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the --set values and list the experiments, without running them",
    )
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime())
    return args
