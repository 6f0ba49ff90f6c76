"""Callbacks that write a run's side files next to its checkpoints (names: `runs.files`)."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from runs import files
from runs.files import RunFiles


def run_dir_of(trainer: Trainer) -> Path:
    """The run directory (MedselCLI sets default_root_dir to it). Not `trainer.log_dir`: that is a collective
    call, and these callbacks run on rank 0 only."""
    return Path(trainer.default_root_dir)


class ModelInfoWriter(Callback):
    """At fit start: model.json with the network, classes, input size and parameter count (sweeps rank ties
    by parameter count; serving reads the preprocessing from here)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        out = run_dir_of(trainer)
        out.mkdir(parents=True, exist_ok=True)
        hp = pl_module.hparams
        info = {
            "num_parameters": int(pl_module.num_parameters()),
            "network": hp.get("network"), "classes": list(pl_module.classes), "image_size": hp.get("image_size"),
            "in_chans": hp.get("in_chans"), "loss": hp.get("loss"),
            "positive_class": pl_module.classes[pl_module.positive_index] if len(pl_module.classes) == 2 else None,
        }
        RunFiles(out).write_json(files.MODEL_INFO, info)


class FitTimer(Callback):
    """timing.json: wall-clock time of the train+validation loop versus everything around it.

    The process start time is included so sweeps and benchmarks can tell a run's fixed cost (start-up,
    model build, loggers, data) from its training time.
    """

    def __init__(self):
        self.started = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = time.time()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_start = time.time()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        now = time.time()
        info = {"fit_start": self.started, "train_start": self.train_start, "train_end": now,
                "train_seconds": now - self.train_start, "epochs": trainer.current_epoch}
        RunFiles(run_dir_of(trainer)).write_json(files.TIMING, info)


class TestResultsWriter(Callback):
    """After `test`: test_metrics.json/.csv and the confusion matrix in the run dir (the evaluation report is
    built from the same test outputs by `evaluation.cli.EvaluationCLI`)."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not results or trainer.global_rank != 0:
            return
        run = RunFiles(run_dir_of(trainer))
        classes = results["classes"]
        run.write_json(files.TEST_METRICS, {
            "metrics": results["metrics"],
            "confusion_matrix": {"rows_true_cols_pred": classes, "counts": results["confusion_matrix"]},
            "positive_class": results["positive_class"],
            "n_images": int(len(results["targets"])),
            "checkpoint": trainer.ckpt_path,
        })
        pl.DataFrame([{"metric": k, "value": v} for k, v in results["metrics"].items()]).write_csv(run / files.TEST_METRICS_CSV)
        cm = pl.DataFrame({"true": classes, **{f"pred_{c}": [row[j] for row in results["confusion_matrix"]]
                                               for j, c in enumerate(classes)}})
        cm.write_csv(run / files.TEST_CONFUSION)


class PredictionWriter(BasePredictionWriter):
    """`predict` writes predictions.csv: path (when known), predicted class and one probability per class."""

    def __init__(self):
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat([p for p in predictions]).float().cpu() if predictions else torch.zeros(0, len(pl_module.classes))
        classes = pl_module.classes
        dm = trainer.datamodule
        paths = getattr(dm, "predict_paths", None) if getattr(dm, "predict_source", None) else dm.split_paths("test")
        frame = pl.DataFrame({
            **({"path": paths} if paths is not None and len(paths) == len(probs) and trainer.world_size == 1 else {}),
            "predicted": [classes[int(i)] for i in probs.argmax(1)] if len(probs) else [],
            **{f"p_{c}": probs[:, j].tolist() for j, c in enumerate(classes)},
        })
        out = run_dir_of(trainer)
        out.mkdir(parents=True, exist_ok=True)
        name = files.PREDICTIONS if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        frame.write_csv(out / name)
        print(f"[predict] wrote {len(frame)} predictions to {out / name}")
