"""`cli.py` end to end: config validation, fit/test run directories, DDP on CPU, learning on real data."""

from __future__ import annotations

import json
import re

import polars as pl
import torch

from tests.conftest import REPO, run_cli, small_fit_args


def only_run_dir(runs):
    dirs = [d for d in runs.rglob("config.yaml")]
    assert len(dirs) == 1, dirs
    return dirs[0].parent


def test_misspelled_key_is_an_error(tmp_path):
    proc = run_cli("fit", *small_fit_args(tmp_path / "a", tmp_path / "runs", "--data.batchsize=3"))
    assert proc.returncode != 0
    assert "batchsize" in proc.stdout


def test_misspelled_key_in_config_file_is_an_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((REPO / "configs" / "demo.yaml").read_text().replace("early_stopping_patience", "early_stoping_patience"))
    proc = run_cli("fit", "--config", str(cfg), "--trainer.max_epochs=1")
    assert proc.returncode != 0 and "early_stoping_patience" in proc.stdout


def test_print_config_shows_every_section():
    proc = run_cli("fit", "--config", str(REPO / "configs" / "demo.yaml"), "--print_config")
    assert proc.returncode == 0, proc.stdout
    for key in ("run:", "data:", "model:", "trainer:", "network:", "split:"):
        assert key in proc.stdout


def test_fit_then_test_writes_a_complete_run_dir(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli("fit", *small_fit_args(tmp_path / "a", runs, "--run.wandb=offline", epochs=2))
    assert proc.returncode == 0, proc.stdout[-3000:]
    run_dir = only_run_dir(runs)
    for name in ("config.yaml", "metrics.csv", "split.json", "split_counts.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    history = pl.read_csv(run_dir / "metrics.csv")
    for col in ("train/acc", "val/acc", "val/loss", "val/overfit", "val/mcc", "val/auroc", "val/specificity"):
        assert col in history.columns
    ep = history.filter(pl.col("val/overfit").is_not_null())
    train_acc = history.filter(pl.col("train/acc").is_not_null())["train/acc"]
    val_acc = history.filter(pl.col("val/acc").is_not_null())["val/acc"]
    assert abs(ep["val/overfit"][-1] - (train_acc[-1] - val_acc[-1])) < 1e-5

    proc = run_cli("test", "--config", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(results["metrics"]) == {"loss", "nll", "acc", "balanced_acc", "precision", "sensitivity", "specificity", "f1", "mcc", "auroc"}
    assert sum(map(sum, results["confusion_matrix"]["counts"])) == results["n_images"] == 24
    assert (run_dir / "test_metrics.csv").exists() and (run_dir / "config_test.yaml").exists()
    assert pl.read_csv(run_dir / "metrics.csv").height == history.height  # test did not overwrite the training log
    preds = pl.read_parquet(run_dir / "test_predictions.parquet")
    assert preds.height == 24 and all(p.endswith(".png") for p in preds["path"])

    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["classes"] == ["normal", "ASD", "VSD", "PDA"]

    proc = run_cli("predict", "--config", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert pl.read_csv(run_dir / "predictions.csv").height == 24


def test_test_without_a_model_says_what_to_pass(tmp_path):
    proc = run_cli("test", *small_fit_args(tmp_path / "a", tmp_path / "runs"))
    assert proc.returncode == 2
    assert "needs a trained model" in proc.stdout and "Traceback" not in proc.stdout


def test_ddp_two_cpu_processes_train_on_identical_splits(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli("fit", *small_fit_args(
        tmp_path / "a", runs, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--data.batch_size=8", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
    ), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = dict(re.findall(r"\[data\] rank (\d)/2 uses split \S+ assignment (\w+)", proc.stdout))
    assert set(ranks) == {"0", "1"}, proc.stdout[-3000:]
    assert ranks["0"] == ranks["1"]
    run_dir = only_run_dir(runs)
    assert (run_dir / "checkpoints" / "best.ckpt").exists()


def test_fit_then_test_learns_on_covid_ct(tmp_path, covid_ct, shared_artifacts):
    """Small backbone, small images, from scratch: test accuracy clearly above the majority-class rate."""
    runs = tmp_path / "runs"
    proc = run_cli(
        "fit", "--config", str(REPO / "configs" / "covid_ct.yaml"), f"--data.source={covid_ct / 'metadata.csv'}",
        f"--data.artifacts_dir={shared_artifacts}", "--data.image_size=64", "--model.network={name: resnet10t, pretrained: false, pool: null, hidden: null, dropout: null}",
        "--model.loss=ce", "--model.optimizer.init_args.lr=0.002", "--trainer.max_epochs=10", f"--run.root={runs}",
        "--run.wandb=disabled", "--trainer.enable_progress_bar=false",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    run_dir = only_run_dir(runs)
    proc = run_cli("test", "--config", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((run_dir / "test_metrics.json").read_text())
    counts = results["confusion_matrix"]["counts"]
    majority = max(sum(row) for row in counts) / results["n_images"]
    print(f"COVID-CT test: {json.dumps(results['metrics'])}, majority rate {majority:.3f}")
    assert results["metrics"]["acc"] >= majority + 0.10
    assert results["metrics"]["auroc"] >= 0.70
