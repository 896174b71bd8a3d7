"""The command lines of `python -m flows.pipeline` and `python -m flows.serve`.

Standard library only: each module parses its command line first, before it imports DVC and
Prefect (seconds), so `--help` and a bad argument answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DEFAULT_CRON = "0 3 * * *"  # every day at 03:00


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
