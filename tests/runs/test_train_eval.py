"""The eval-mode pass at fit end: train_eval.json and val_predictions.parquet of the best checkpoint."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from runs import files


def test_train_eval_measures_the_best_checkpoint_in_eval_mode(trained_run):
    info = json.loads((trained_run / files.TRAIN_EVAL).read_text())
    m = info["metrics"]
    assert info["checkpoint"].endswith("best.ckpt")
    preds = pl.read_parquet(trained_run / files.VAL_PREDICTIONS)
    probs = preds.select(pl.col("^p_.*$")).to_numpy()
    assert preds.height == info["n_val"] and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert {"path", "patient_id", "target"} <= set(preds.columns)
    val_acc = float((probs.argmax(1) == preds["target"].to_numpy()).mean())
    assert m["train_eval/val_acc"] == pytest.approx(val_acc)
    assert m["train_eval/overfit"] == pytest.approx(m["train_eval/acc"] - m["train_eval/val_acc"])
    # The best epoch's logged val/acc was measured on the same images with the same weights.
    table = pl.read_csv(trained_run / files.METRICS, infer_schema_length=None).filter(pl.col("val/loss").is_not_null())
    best = table.sort("val/loss").row(0, named=True)
    assert m["train_eval/val_acc"] == pytest.approx(best["val/acc"], abs=1e-6)


def test_train_eval_accuracy_is_the_unaugmented_train_split(trained_run):
    import copy

    import yaml

    from datamodules import ImageDataModule
    from datamodules.splits import SplitConfig
    from lightning_modules.classifier import ImageClassifier

    data = yaml.safe_load((trained_run / files.CONFIG).read_text())["data"]
    dm = ImageDataModule(source=data["source"], classes=data["classes"], image_size=data["image_size"],
                         artifacts_dir=data["artifacts_dir"], split=SplitConfig(**data["split"]), num_workers=0)
    dm.setup("fit")
    plain = copy.copy(dm.datasets["train"])
    plain.transform = None
    model = ImageClassifier.load_trained(files.RunFiles(trained_run).best_checkpoint)
    with torch.inference_mode():
        batches = [(model.predict_step((x, y), 0).argmax(1), y) for x, y in torch.utils.data.DataLoader(plain, 64)]
    acc = float(torch.cat([(p == y) for p, y in batches]).float().mean())
    info = json.loads((trained_run / files.TRAIN_EVAL).read_text())
    assert info["n_train"] == len(plain)
    assert info["metrics"]["train_eval/acc"] == pytest.approx(acc, abs=1e-6)
