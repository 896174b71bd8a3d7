"""Train checkpoints: what an interrupted training run needs to finish as if it never stopped.

The train stage writes one atomically at the end of each epoch (and every
`train.checkpoint_every_steps` batches) to models/checkpoints/train.pt. That path is outside
every DVC out, so a checkpoint never makes DVC see the stage as changed. Each checkpoint carries
fingerprints of the params, the data and the code (with torch's version, the device and the
thread count) it belongs to. A checkpoint that belongs to others, or that cannot be loaded
safely, is ignored with a log line saying why. The stage deletes the checkpoint once the final
weights are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages import numerics
from stages.artifacts import load_torch, save_torch, source_digest
from stages.config import Params

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = {
    "fingerprints",
    "epoch",
    "order",
    "record",
    "history",
    "model",
    "optimizer",
    "scheduler",
    "rng",
}
# Settings that change how often checkpoints are written, not what training computes.
NOT_FINGERPRINTED = {"checkpoint_every_steps"}


def fingerprints(
    params: Params, device: torch.device, num_threads: int, data_digests: dict[str, str]
) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the params, the data (the sha256 of each
    processed file training reads) and the code."""
    return {
        "params": _sha256_json(
            {
                "seed": params.seed,
                "train": params.train.model_dump(exclude=NOT_FINGERPRINTED),
                "evaluate": params.evaluate.model_dump(),
            }
        ),
        "data": _sha256_json(data_digests),
        # The thread count changes how CPU kernels split their sums, so it is part of the run.
        "code": _sha256_json(
            {
                "stages": source_digest(),
                "torch": torch.__version__,
                "device": str(device),
                "threads": num_threads,
                "numerics": numerics.describe(),
            }
        ),
    }


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def capture_rng(
    generators: dict[str, torch.Generator | None], device: torch.device
) -> dict[str, Any]:
    """Every RNG state: Python's, NumPy's, torch's (CPU, and the CUDA device trained on) and the
    named generators'."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        # As a tensor and plain numbers: weights_only loading refuses NumPy arrays.
        "numpy": [
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached_gaussian),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generators": {name: g.get_state() for name, g in generators.items() if g is not None},
    }


def restore_rng(
    states: dict[str, Any], generators: dict[str, torch.Generator | None], device: torch.device
) -> None:
    random.setstate(states["python"])
    keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(
        ("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:  # the fingerprint guarantees the same device
        torch.cuda.set_rng_state(states["cuda"], device)
    for name, generator in generators.items():
        if generator is not None:
            generator.set_state(states["generators"][name])


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generators: dict[str, torch.Generator | None],
    device: torch.device,
) -> dict[str, Any]:
    """The model, optimizer and scheduler states and every RNG state, for save_checkpoint."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(generators, device),
    }


def restore_training(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generators: dict[str, torch.Generator | None],
    device: torch.device,
) -> None:
    """Puts back what training_state saved."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], generators, device)


def save_checkpoint(path: Path, expected: dict[str, str], state: dict[str, Any]) -> None:
    save_torch({"format": CHECKPOINT_FORMAT, "fingerprints": expected, **state}, path)


def load_checkpoint(
    path: Path, expected: dict[str, str], log: logging.Logger | logging.LoggerAdapter
) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to these fingerprints; else None, saying why."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = load_torch(path)
    except Exception as exc:  # a pickle with code in it, a foreign format: never executed
        log.warning(
            "ignoring checkpoint %s: it cannot be loaded safely (%s)",
            path,
            str(exc).splitlines()[0],
        )
        return None
    if (
        not isinstance(state, dict)
        or state.get("format") != CHECKPOINT_FORMAT
        or not state.keys() >= REQUIRED_KEYS
    ):
        log.warning(
            "ignoring checkpoint %s: not a format-%d train checkpoint", path, CHECKPOINT_FORMAT
        )
        return None
    found = state["fingerprints"] if isinstance(state["fingerprints"], dict) else {}
    for what, fingerprint in expected.items():
        if found.get(what) != fingerprint:
            log.warning("ignoring checkpoint %s: it belongs to other %s", path, what)
            return None
    return state
