"""python -m flows.pipeline [--force] [--target STAGE ...] [--wait-for-lock]

The whole pipeline as one Prefect flow, `fashion-mnist-pipeline`, sharing DVC's truth.

DVC decides everything `dvc repro` decides (which stages run, in what order, what goes into
dvc.lock and the DVC cache); each stage that runs is its module's Prefect task, run in this
process, so its logs show in the UI. A stage DVC finds up to date shows as a Completed task run
named `Cached`. flows/dvc_runner.py has the mechanics.

A flow run and a `dvc repro` never interleave: the one that comes second fails within seconds
with a clear "busy" error, or waits if asked to (`--wait-for-lock` here, `dvc --wait-for-lock
repro` there).
"""

from __future__ import annotations

import argparse

from flows.cli import pipeline_args

if __name__ == "__main__":  # --help and a bad argument answer before DVC and Prefect load
    ARGS = pipeline_args(__doc__)

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from dvc.exceptions import DvcException
from dvc.repo import Repo
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.dvc_runner import RunRecord, reproduce
from stages.config import EVAL_DIR, PARAMS_FILE, load_params
from stages.errors import StageError
from stages.runtime import prefect_api_url, require_prefect_server

FLOW_NAME = "fashion-mnist-pipeline"


def code_and_params_tags(root: Path) -> list[str]:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "none"
    params_hash = hashlib.sha256((root / PARAMS_FILE).read_bytes()).hexdigest()[:10]
    return [f"git:{revision}", f"params:{params_hash}"]


def tag_this_flow_run(tags: list[str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=sorted({*run.tags, *tags}))


def publish_artifacts(root: Path, record: RunRecord) -> None:
    metrics_path = root / EVAL_DIR / "metrics.json"
    per_class_path = root / EVAL_DIR / "per_class.csv"
    if metrics_path.is_file() and per_class_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        create_table_artifact(
            key="test-metrics",
            table=[{"metric": k, "value": v} for k, v in metrics.items()],
            description="Test-split metrics (reports/evaluate/metrics.json)",
        )
        create_table_artifact(
            key="per-class-metrics",
            table=pd.read_csv(per_class_path).to_dict(orient="records"),
            description="Per-class precision, recall and F1 on the test split",
        )
    rows = "\n".join(
        f"| {name} | {stage.status} | {stage.seconds:.1f} s | {stage.note} |"
        for name, stage in record.stages.items()
    )
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=f"# FashionMNIST pipeline\n\nDevice: `{record.device}`\n\n"
        f"| stage | status | wall time | note |\n|---|---|---|---|\n{rows}\n",
        description="What this run did",
    )


@flow(name=FLOW_NAME)
def pipeline(
    force: bool = False, targets: list[str] | None = None, wait_for_lock: bool = False
) -> dict[str, str]:
    """Reproduces the DVC pipeline (or `targets` and what they need), stage by stage as tasks.

    force: rerun every stage even when DVC finds it up to date (like `dvc repro --force`).
    targets: stage names to reproduce with their upstream stages (like `dvc repro TARGET`).
    wait_for_lock: wait for a concurrent `dvc repro` or flow run instead of failing at once.
    """
    logger = get_run_logger()
    logger.info("flow run id %s", flow_run.id)
    root = Path(Repo.find_root())
    load_params(root / PARAMS_FILE)  # a bad params.yaml stops the run before any stage
    tag_this_flow_run(code_and_params_tags(root))
    record = reproduce(root, targets, force, wait_for_lock)
    publish_artifacts(root, record)
    summary = {name: stage.status for name, stage in record.stages.items()}
    logger.info("stages: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    return run(pipeline_args(__doc__, argv))


def run(args: argparse.Namespace) -> int:
    try:
        if api_url := prefect_api_url():
            require_prefect_server(api_url)
        pipeline(force=args.force, targets=args.targets, wait_for_lock=args.wait_for_lock)
    except (StageError, DvcException) as exc:
        # DVC wraps a failed stage's error ("failed to reproduce 'train'"): show both.
        cause = f": {exc.__cause__}" if isinstance(exc.__cause__, StageError) else ""
        print(f"error: {exc}{cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run(ARGS))
