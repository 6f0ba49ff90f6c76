"""`cli.py export` on a trained run: the files it writes, the parity it records, the refusals, the card."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from export import formats, layout
from export.model_card import write_model_card
from runs import files
from tests.conftest import cli_in_process


def test_onnx_export_writes_the_model_its_preprocessing_and_the_recorded_parity(onnx_export, trained):
    record = json.loads((onnx_export / layout.EXPORT).read_text())
    assert record["sha256"] == hashlib.sha256((onnx_export / layout.ONNX).read_bytes()).hexdigest()
    p = record["parity"]
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and p["argmax_mismatches"] == 0
    assert "test split" in p["source"] and p["images"] > 1 and 1 in p["batch_sizes"] and max(p["batch_sizes"]) > 1
    prep = json.loads((onnx_export / layout.PREPROCESSING).read_text())
    model = trained.opened.model
    size, chans = model.hparams["image_size"], model.hparams["in_chans"]
    assert (size, chans) == (64, 3)  # tests/conftest.py's trained_run
    assert prep["classes"] == list(model.classes) == ["normal", "ASD", "VSD", "PDA"]
    assert prep["input_size"] == {"height": size, "width": size} and prep["channels"] == chans
    assert prep["resize"] == model.hparams["resize"] == "squash" and prep["resize_rule"].startswith("stretch")
    assert prep["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", size, size, chans],
                             "range": [0, 255]}
    assert prep["output"]["shape"] == ["batch", 4] and prep["dicom"]["window"] is None
    assert prep["normalization"]["mean"] == model.net.mean.flatten().tolist()
    assert {layout.MODEL_CARD_MD, layout.MODEL_CARD_JSON} <= {f.name for f in onnx_export.iterdir()}
    assert not list(onnx_export.glob(".*partial"))


def test_onnx_export_gives_the_models_probabilities_on_its_test_images(onnx_export, trained):
    dm = trained.opened.datamodule
    dm.setup("test")
    images = torch.cat([x for x, _ in dm.test_dataloader()])  # (N, 32, 32, 3) uint8
    model = trained.opened.model.eval()
    with torch.inference_mode():
        expected = model.predict_probabilities(images).numpy()
    got = formats.OnnxRunner(onnx_export / layout.ONNX)(images.numpy())
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_torchscript_export_loads_with_torch_jit_alone(trained, tmp_path: Path):
    out = tmp_path / "ts"
    assert cli_in_process("export", "--run", str(trained.run_dir), "--format", "torchscript", "--out", str(out),
                          "--parity", "random", "--parity_images", "5") == 0
    record = json.loads((out / layout.EXPORT).read_text())
    assert record["file"] == layout.TORCHSCRIPT and record["parity"]["source"] == "5 random uint8 images, seed 0"
    assert record["parity"]["batch_sizes"] == [1, 4]
    scripted = torch.jit.load(str(out / layout.TORCHSCRIPT))
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(x).numpy(), trained.opened.model.eval().predict_probabilities(x).numpy(), atol=1e-5)


def test_failed_parity_writes_no_model_and_is_one_error_line(trained, tmp_path: Path, monkeypatch, capsys):
    class Off(formats.OnnxRunner):
        def __call__(self, images):
            return super().__call__(images)[:, ::-1].copy()  # classes swapped: every argmax may differ

    monkeypatch.setitem(formats.RUNNERS, "onnx", Off)
    out = tmp_path / "refused"
    assert cli_in_process("export", "--run", str(trained.run_dir), "--out", str(out), "--parity", "random") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the onnx export does not reproduce the model on 64 images") and "Nothing was written" in err[-1]
    assert not (out / layout.ONNX).exists() and not list(out.glob(".*partial")) and not (out / layout.EXPORT).exists()


def test_not_a_run_is_one_error_line(tmp_path: Path, capsys):
    assert cli_in_process("export", "--run", str(tmp_path), "--format", "onnx") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not a sweep folder" in err[0]


def _flat(metrics: dict) -> dict:
    return {(k, b): v[b] for k, v in metrics.items() for b in ("value", "low", "high")}


def test_model_card_numbers_are_the_evaluations(trained, tmp_path: Path):
    write_model_card(trained.run_dir, tmp_path)
    card = json.loads((tmp_path / layout.MODEL_CARD_JSON).read_text())
    md = (tmp_path / layout.MODEL_CARD_MD).read_text()
    evaluation = json.loads(files.RunFiles(trained.run_dir).evaluation.read_text())
    assert _flat(card["test"]["metrics"]) == _flat(evaluation["metrics"])
    assert card["test"]["per_class"] == evaluation["per_class"] and card["test"]["n_images"] == evaluation["n_images"]
    for name, m in evaluation["metrics"].items():
        assert f"| {name} | {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}] |" in md
    for metric, per in evaluation["per_class"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {metric} | ") and line.count("[") > 1)
        assert all(f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" in row for v in per.values())
    counts = {r["class"]: r for r in csv.DictReader((trained.run_dir / files.SPLIT_COUNTS).open())}
    assert card["data"]["counts"]["total"]["test"] == int(counts["total"]["test"]) == evaluation["n_images"]
    assert f"{evaluation['n_images']} test images" in md and "Research use only" in md
    assert card["model"]["num_parameters"] == json.loads((trained.run_dir / files.MODEL_INFO).read_text())["num_parameters"]
    assert card["selection"] is None and "A single run (not selected by a sweep)" in md
    assert any("Small test set" in item and str(evaluation["n_images"]) in item for item in card["limitations"])
    assert card["software"]["reproduce"] == f"python cli.py fit --config {tmp_path / 'config.yaml'}"
    assert (tmp_path / "config.yaml").read_text() == files.RunFiles(trained.run_dir).config.read_text()


def test_model_card_of_a_run_without_evaluation_says_so(tmp_path: Path):
    run = tmp_path / "run"
    (run / files.CHECKPOINTS).mkdir(parents=True)
    (run / files.CHECKPOINTS / "best.ckpt").write_bytes(b"")
    write_model_card(run, tmp_path / "card")
    md = (tmp_path / "card" / layout.MODEL_CARD_MD).read_text()
    assert "Not measured (evaluation.json absent)" in md and "performance is unmeasured" in md


def test_card_selection_names_the_indistinguishable_set_and_the_parsimonious_choice(tmp_path: Path):
    from export.model_card import selection_section

    (tmp_path / "stage1_leaderboard.csv").write_text(
        "rank,candidate,params,vs_winner,indistinguishable\n"
        "1,resnet10t,4924540,,\n2,ctnet10,234724,\"+0.021 [-0.083, +0.125]\",true\n"
        "3,vgg16,14000000,\"-0.300 [-0.400, -0.200]\",false\n")
    (tmp_path / "sweep.yaml").write_text("name: s\nrepeats: 3\ncv: {folds: 5, final: refit}\npruner: median\n"
                                         "selection: {rule: metric, metric: val/mcc, direction: maximize}\n"
                                         "stage1: {candidates: [{network: resnet10t}], defaults: {max_epochs: 6}}\n")
    (tmp_path / files.WINNER).write_text(json.dumps({"sweep": "s", "base_architecture": "resnet10t", "params": 4924540}))
    s = selection_section(tmp_path)
    board = s["stages"]["stage1"]["leaderboard"]
    assert board["winner"] == "resnet10t" and board["indistinguishable"] == ["resnet10t", "ctnet10"]
    assert board["parsimonious"] == "ctnet10" and board["parsimonious_params"] == 234724
    assert s["stages"]["stage2"]["leaderboard"] is None
    assert s["rule"] == {"rule": "metric", "metric": "val/mcc", "direction": "maximize", "ties": "fewer parameters"}
    assert s["repeats"] == 3 and s["cv"]["folds"] == 5 and s["budget"] == {"pruner": "median", "early_stopping_patience": None,
                                                                           "max_epochs": 6}
    from export.model_card_text import _selection

    text = "\n".join(_selection({"selection": s}))
    assert "rule **metric** (val/mcc (maximize))" in text and "parsimonious choice: **ctnet10** (234,724 parameters)" in text
    assert "cross-validation folds: 5" in text and "pruner median" in text
