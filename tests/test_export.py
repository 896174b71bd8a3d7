import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from stages.config import Params
from stages.evaluate import evaluate
from stages.export import export
from stages.model import NeuralNetwork


def test_export_writes_loadable_weights_and_a_card(
    tmp_path: Path, raw_dir: Path, trained: dict[str, Path], small_params: Params
) -> None:
    eval_dir = tmp_path / "reports" / "evaluate"
    evaluate.fn(small_params, **trained, out_dir=eval_dir)
    out = tmp_path / "models"
    export.fn(
        small_params, trained["weights_path"], trained["processed_dir"], raw_dir, eval_dir, out
    )

    model = NeuralNetwork()
    state = torch.load(out / "model_weights.pth", weights_only=True)
    model.load_state_dict(state, strict=True)
    tensors = load_file(out / "model.safetensors")
    assert all(torch.equal(tensors[k], state[k]) for k in state)

    card = json.loads((out / "model_card.json").read_text())
    assert card["metrics"] == json.loads((eval_dir / "metrics.json").read_text())
    assert card["params"]["train"]["epochs"] == 2 and "download" not in card["params"]
    assert set(card["data"]) == {p.name for p in raw_dir.iterdir()}
    assert len(card["code"]["stages_sha256"]) == 64
    assert card["input"]["normalize"]["std"] > 0
    assert "strict=True" in (out / "model_card.md").read_text()
