"""The issue's acceptance path on a real (tiny) sweep of the embedded data: `cli.py export` on the sweep's
winner writes the ONNX model, its preprocessing file and the card, and `serve` on the export answers the
probabilities `serve` on the sweep folder answers (slow: the sweep trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from export import layout
from runs import files
from serving.app import Limits, create_app
from serving.onnx_backend import OnnxPredictor
from tests.conftest import run_cli
from tests.serving.conftest import png_bytes, post
from tests.sweeps.test_e2e import write_sweep


@pytest.mark.slow
def test_export_of_the_sweep_winner_serves_the_sweeps_answers(tmp_path: Path, shared_artifacts):
    from serving.model import Predictor, locate

    cfg = write_sweep(tmp_path, shared_artifacts, stage2={"optimizers": ["adam"], "losses": ["ce", "mse"]})
    assert run_cli("sweep", "--config", str(cfg)).returncode == 0
    sweep = tmp_path / "sweeps" / "t"
    proc = run_cli("export", "--run", str(sweep), "--format", "onnx")
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = sweep / "export_onnx"
    record = json.loads((out / layout.EXPORT).read_text())
    winner = json.loads((sweep / files.WINNER).read_text())
    assert record["parity"]["passed"] and record["parity"]["images"] == winner["test"]["n_images"]
    assert {layout.ONNX, layout.PREPROCESSING, layout.MODEL_CARD_MD, layout.MODEL_CARD_JSON, "winner.yaml"} <= {p.name for p in out.iterdir()}

    card = json.loads((out / layout.MODEL_CARD_JSON).read_text())
    evaluation = json.loads((sweep / winner["run_dir"] / files.EVALUATION).read_text())
    assert card["test"]["metrics"] == evaluation["metrics"]
    assert card["selection"]["winner"]["base_architecture"] == winner["base_architecture"]
    assert set(card["selection"]["stages"]["stage1"]["leaderboard"]["grid_points"]) == {"resnet10t", "ctnet10"}
    assert card["selection"]["stages"]["stage1"]["leaderboard"]["winner"] == winner["base_architecture"]
    assert f"python cli.py fit --config {out / 'winner.yaml'}" in (out / layout.MODEL_CARD_MD).read_text()

    limits = Limits(max_bytes=200_000, max_pixels=1_000_000, decode_slots=2)
    on_sweep = TestClient(create_app(Predictor(locate(sweep), "cpu", "gradcam"), limits))
    on_export = TestClient(create_app(OnnxPredictor(out), limits))
    for seed in range(4):
        data = png_bytes((64 + 7 * seed, 48), seed=seed)
        a, b = post(on_sweep, data).json(), post(on_export, data).json()
        assert a["class"] == b["class"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) <= 1e-4
