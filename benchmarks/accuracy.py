"""python benchmarks/accuracy.py [--seeds 0 1 2] [--set train.model=cnn ...] [--split val]

Trains the train stage with params.yaml (changed by any --set, validated the same way) on
several seeds (weight init, batch order, augmentation) and scores each on the test split, as the
evaluate stage does, or on the validation split with `--split val` (to choose params without
looking at the test split). Prints one JSON line: {"seeds", "split", "accuracies", "mean",
"epochs", "wall_s"}, plus "set" when given. Needs data/processed (`dvc repro preprocess`); writes
only to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

from stages.config import PROCESSED_DIR, Params, ParamsError, load_params, parse_params
from stages.dataset import load_dataset, make_loader
from stages.device import resolve_device
from stages.model import accuracy, load_model, test_loop
from stages.train import train


def with_overrides(settings: list[str]) -> Params:
    """params.yaml with each `section.key=value` (value in YAML) applied, then validated."""
    raw = load_params().model_dump(mode="json")
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--set {setting}: expected section.key=value")
        if key == "seed":
            raise SystemExit(f"--set {setting}: the seeds come from --seeds")
        *sections, name = key.split(".")
        target = raw
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = YAML(typ="safe").load(value)  # YAML 1.2, as DVC and the stages read it
    try:
        return parse_params(raw, f"params.yaml with --set {' '.join(settings)}")
    except ParamsError as exc:
        raise SystemExit(f"error: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="train once per seed (default: 0 1 2)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change a parameter for this run, e.g. train.epochs=10",
    )
    parser.add_argument(
        "--split", choices=("test", "val"), default="test", help="score on (default: test)"
    )
    args = parser.parse_args()
    params = with_overrides(args.set)
    device = resolve_device(params.device)
    test_data = load_dataset(PROCESSED_DIR, args.split, device)
    accuracies = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            out = Path(tmp) / str(seed)
            train.fn(
                params.model_copy(update={"seed": seed}),
                PROCESSED_DIR,
                out / "model_weights.pth",
                out / "live",
                out / "checkpoint.pt",
            )
            model = load_model(out / "model_weights.pth", params.train, device)
            loader = make_loader(test_data, params.evaluate.batch_size, shuffle=False)
            _, predictions = test_loop(loader, model)
            accuracies.append(round(accuracy(predictions, test_data.labels), 4))
    print(
        json.dumps(
            {
                **({"set": args.set} if args.set else {}),
                "seeds": args.seeds,
                "split": args.split,
                "accuracies": accuracies,
                "mean": round(sum(accuracies) / len(accuracies), 4),
                "epochs": params.train.epochs,
                "wall_s": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
