"""python -m stages.validate

Checks params.yaml as every stage reads it: an unknown key (a misspelt section such as
`trian:`), a wrong type or a value out of range stops the pipeline here, naming the key. dvc.yaml
runs this stage first and tracks all of params.yaml for it, so any edit reruns this check (about
2 s) and nothing else that the edit does not concern. It writes nothing.
"""

from __future__ import annotations

from stages.cli import parse_args

if __name__ == "__main__":  # --help and a bad argument answer before torch and Prefect load
    ARGS = parse_args("validate", __doc__)

from prefect import task
from prefect.cache_policies import NONE

from stages.config import Params
from stages.runtime import run_cli, stage_logger


@task(name="validate", cache_policy=NONE, persist_result=False)
def validate(params: Params) -> dict:
    """params.yaml was read and validated on the way in (load_params); this reports it."""
    stage_logger("validate").info(
        "params.yaml: valid (seed %d, device %s, train.model %s)",
        params.seed,
        params.device,
        params.train.model,
    )
    return params.model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    return run_cli(validate, parse_args("validate", __doc__, argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(validate, ARGS))
