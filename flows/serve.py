"""python -m flows.serve [--cron "0 3 * * *"] [--timezone UTC] [--pull] [--push]

Registers the deployment `fashion-mnist-pipeline/scheduled` on a running Prefect server and serves
it: runs come from the cron schedule, or from "Run" in the Prefect UI, and execute here, in this
repository, one at a time. Stop with Ctrl-C.

Schedules need a real server (Prefect's temporary one exits with this process), so this refuses
to start without a reachable PREFECT_API_URL:

    make server          # in another terminal; UI on http://127.0.0.1:4200 (PORT=N for another)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve
"""

from __future__ import annotations

import argparse

from flows.cli import beat_often, serve_args

if __name__ == "__main__":  # --help and a bad argument answer before Prefect loads
    ARGS = serve_args(__doc__)
    beat_often()  # before Prefect reads its settings

import os
import sys
from pathlib import Path

from stages.errors import StageError
from stages.runtime import START_SERVER_HINT, prefect_api_url, require_prefect_server

DEPLOYMENT_NAME = "scheduled"


def main(argv: list[str] | None = None) -> int:
    return run(serve_args(__doc__, argv))


def run(args: argparse.Namespace) -> int:
    url = prefect_api_url()
    try:
        if not url:
            raise StageError(
                f"no Prefect server configured (PREFECT_API_URL is unset); {START_SERVER_HINT}"
            )
        require_prefect_server(url)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    from dvc.repo import Repo
    from prefect.schedules import Cron

    from flows.pipeline import FLOW_NAME, pipeline

    # Runs execute in this process's folder: make that the repository root.
    os.chdir(Repo.find_root())
    print(f"serving {FLOW_NAME}/{DEPLOYMENT_NAME} from {Path.cwd()} against {url}", flush=True)
    pipeline.serve(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(args.cron, timezone=args.timezone)],
        description="The FashionMNIST DVC pipeline, run stage by stage as Prefect tasks",
        tags=["fashion-mnist"],
        # the defaults of the runs the schedule starts; "Run" in the UI can change them
        parameters={"pull": args.pull, "push": args.push},
        limit=1,  # one run at a time; DVC's lock would refuse a second anyway
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(ARGS))
