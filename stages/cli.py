"""The command line every stage shares: `python -m stages.<name> [--params PATH]`.

Standard library only. Each stage module parses its command line with `parse_args` first, before
it imports torch and Prefect (seconds), so `--help` and a bad argument answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

# The same file as stages.config.PARAMS_FILE (tests/test_runtime.py checks), named here so that
# `--help` can show it without importing the params models.
PARAMS_FILE = Path("params.yaml")


def parse_args(
    stage: str, description: str | None, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """`python -m stages.<stage>`'s arguments from `argv` (default: sys.argv); exits on --help."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", type=Path, default=PARAMS_FILE, help="parameters file (default: %(default)s)"
    )
    return parser.parse_args(argv)
