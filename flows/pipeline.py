"""python -m flows.pipeline [--force] [--target STAGE ...] [--wait-for-lock] [--pull] [--push]

The whole pipeline as one Prefect flow, `fashion-mnist-pipeline`, sharing DVC's truth.

DVC decides everything `dvc repro` decides (which stages run, in what order, what goes into
dvc.lock and the DVC cache); each stage that runs is its module's Prefect task, run in this
process, so its logs show in the UI. A stage DVC finds up to date shows as a Completed task run
named `Cached`. flows/dvc_runner.py has the mechanics.

With `--pull` it first takes what the default DVC remote has, so a fresh clone runs only the
stages whose outs the remote lacks; with `--push` it uploads what it made (flows/remote.py).

A flow run and a `dvc repro` never interleave: the one that comes second fails within seconds
with a clear "busy" error, or waits if asked to (`--wait-for-lock` here, `dvc --wait-for-lock
repro` there).

Its Prefect server is PREFECT_API_URL's, checked before the run; without one, a temporary server
of its own that ends with the run. A run stops within seconds, with one `error:` line, on SIGTERM
or SIGINT (exit 143, 130), and when its server goes away (exit 1): the stages it finished keep
their outs and dvc.lock entries, and the one it was running replaces no out.
"""

from __future__ import annotations

import argparse

from flows.cli import beat_often, pipeline_args

if __name__ == "__main__":  # --help and a bad argument answer before DVC and Prefect load
    ARGS = pipeline_args(__doc__)
    beat_often()  # before Prefect reads its settings

import hashlib
import json
import subprocess
from pathlib import Path

import pandas as pd
from dvc.repo import Repo
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows import remote
from flows.dvc_lock import require_writable_checkout
from flows.dvc_runner import RunRecord, reproduce
from flows.prefect_server import ServerWatch, flow_server, report_end
from stages.config import EVAL_DIR, PARAMS_FILE, load_params
from stages.runtime import prefect_api_url, require_prefect_server
from stages.signals import StageStopped, stop_on_signals

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


def publish_artifacts(root: Path, record: RunRecord, transfers: list[str]) -> None:
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
    remote = "".join(f"- {line}\n" for line in transfers) or "- no pull, no push\n"
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=f"# FashionMNIST pipeline\n\nDevice: `{record.device}`\n\n"
        f"| stage | status | wall time | note |\n|---|---|---|---|\n{rows}\n\n"
        f"## DVC remote\n\n{remote}",
        description="What this run did",
    )


@flow(name=FLOW_NAME)
def pipeline(
    force: bool = False,
    targets: list[str] | None = None,
    wait_for_lock: bool = False,
    pull: bool = False,
    push: bool = False,
) -> dict[str, str]:
    """Reproduces the DVC pipeline (or `targets` and what they need), stage by stage as tasks.

    force: rerun every stage even when DVC finds it up to date (like `dvc repro --force`).
    targets: stage names to reproduce with their upstream stages (like `dvc repro TARGET`).
    wait_for_lock: wait for a concurrent `dvc repro` or flow run instead of failing at once.
    pull: first take what the default DVC remote has (`dvc pull --allow-missing --run-cache`).
    push: afterwards upload the outs and run-cache to it (`dvc push --run-cache`).
    """
    logger = get_run_logger()
    logger.info("flow run id %s", flow_run.id)
    root = Path(Repo.find_root())
    load_params(root / PARAMS_FILE)  # a bad params.yaml stops the run before any stage
    tag_this_flow_run(code_and_params_tags(root))
    if pull or push:
        remote.require_remote(root)  # before any stage runs, not after
    transfers = []
    if pull:
        transfers.append(remote.pull(root).describe("pulled"))
        logger.info("%s", transfers[-1])
    record = reproduce(root, targets, force, wait_for_lock)
    if push:
        transfers.append(remote.push(root).describe("pushed"))
        logger.info("%s", transfers[-1])
    publish_artifacts(root, record, transfers)
    summary = {name: stage.status for name, stage in record.stages.items()}
    logger.info("stages: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


KEPT = (
    "the stages it finished keep their outs and dvc.lock entries, and the one it was running "
    "replaced no out (train resumes from its last checkpoint)"
)


def main(argv: list[str] | None = None) -> int:
    return run(pipeline_args(__doc__, argv))


def run(args: argparse.Namespace) -> int:
    # A flow run is started by a shell or a scheduler and must outlive a shell that exits.
    stop_on_signals(parent_death=False)
    watch: ServerWatch | None = None
    try:
        url = prefect_api_url()
        if url:
            require_prefect_server(url)
        # What the flow checks first, checked before it starts: one line, not Prefect's traceback.
        root = Path(Repo.find_root())
        require_writable_checkout(root)
        load_params(root / PARAMS_FILE)
        with flow_server(url) as watch:
            pipeline(
                force=args.force,
                targets=args.targets,
                wait_for_lock=args.wait_for_lock,
                pull=args.pull,
                push=args.push,
            )
    except (StageStopped, Exception) as exc:
        return report(exc, watch)
    return 0


def report(exc: BaseException, watch: ServerWatch | None) -> int:
    return report_end(exc, watch, FLOW_NAME, KEPT)


if __name__ == "__main__":
    raise SystemExit(run(ARGS))
