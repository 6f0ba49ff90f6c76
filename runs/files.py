"""The run directory contract: every file a run writes, named once.

    artifacts/runs/<name>/<version>/
        config.yaml              the resolved fit config (LightningCLI's SaveConfigCallback)
        config_<stage>.yaml      the config of a later validate/test/predict on the same run
        checkpoints/best.ckpt    best epoch by run.monitor; holds everything needed to predict
        checkpoints/last.ckpt    last epoch
        metrics.csv              one row per logged step/epoch (CSVLogger)
        model.json               network, classes, input, parameter count
        timing.json              train+validation loop time
        split.json, split_counts.csv, skipped_images.csv   the data the run saw
        pruned.json              present when a sweep's pruner stopped the run
        continuation.json        epochs done and what stopped the fit: until_epoch, max_epochs, early_stopping
        train_eval.json, val_predictions.parquet   the best checkpoint in eval mode on train/val, after `fit`
        test_metrics.json/.csv, test_confusion_matrix.csv, test_predictions.parquet   after `test`
        evaluation.json, report.{md,html,json}, report_files/                        the evaluation report
        predictions.csv          after `predict`
        wandb/                   the W&B run (offline by default)

A sweep folder points at its winner with `winner.json` (`run_dir`, relative to the sweep folder) and keeps
a copy of the winner's checkpoint as `winner.ckpt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The data layer writes these (it sits below `runs`); named there once, part of this contract all the same.
from datamodules.run_record import AUDIT, AUDIT_CLUSTERS, SKIPPED, SPLIT, SPLIT_COUNTS  # noqa: F401

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best"  # ModelCheckpoint filename stem
LAST = "last"  # the last epoch's checkpoint, continued from (runs.continuation)
METRICS = "metrics.csv"
MODEL_INFO = "model.json"
TIMING = "timing.json"
PRUNED = "pruned.json"
CONTINUATION = "continuation.json"  # epochs done and what stopped the fit (runs.continuation)
TEST_METRICS = "test_metrics.json"
TEST_METRICS_CSV = "test_metrics.csv"
TEST_CONFUSION = "test_confusion_matrix.csv"
TEST_PREDICTIONS = "test_predictions.parquet"
TRAIN_EVAL = "train_eval.json"  # the best checkpoint's eval-mode train/val metrics (runs.train_eval)
VAL_PREDICTIONS = "val_predictions.parquet"  # its per-image validation probabilities
EVALUATION = "evaluation.json"
REPORT = "report"  # report.md, report.html, report.json
REPORT_FILES = "report_files"
PREDICTIONS = "predictions.csv"
WINNER = "winner.json"
WINNER_CKPT = "winner.ckpt"
PROGRESS = "progress.jsonl"  # a sweep trial's per-epoch progress, one JSON line per validation epoch


def stage_config(stage: str) -> str:
    """config.yaml for `fit`; config_<stage>.yaml for later stages, so the fit config survives."""
    return CONFIG if stage == "fit" else f"config_{stage}.yaml"


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run directory.

    Example:
        >>> RunFiles(Path("artifacts/runs/demo/v1")).best_checkpoint.as_posix()
        'artifacts/runs/demo/v1/checkpoints/best.ckpt'
    """

    root: Path

    def __truediv__(self, name: str) -> Path:
        return Path(self.root) / name

    @property
    def config(self) -> Path:
        return self / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self / CHECKPOINTS

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / f"{BEST}.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / f"{LAST}.ckpt"

    @property
    def metrics(self) -> Path:
        return self / METRICS

    @property
    def model_info(self) -> Path:
        return self / MODEL_INFO

    @property
    def timing(self) -> Path:
        return self / TIMING

    @property
    def pruned(self) -> Path:
        return self / PRUNED

    @property
    def test_metrics(self) -> Path:
        return self / TEST_METRICS

    @property
    def evaluation(self) -> Path:
        return self / EVALUATION

    @property
    def report_json(self) -> Path:
        return self / f"{REPORT}.json"

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON side file of the run, or None when the run has not written it."""
        path = self / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str))
        return path


def is_run_dir(path: Path) -> bool:
    return RunFiles(path).best_checkpoint.exists()


def winner_run_dir(sweep_dir: Path) -> Path | None:
    """The run directory a sweep folder's winner.json points at (stored relative to the sweep folder;
    absolute paths of older sweeps are accepted)."""
    winner = RunFiles(sweep_dir).read_json(WINNER)
    if winner is None:
        return None
    run_dir = Path(winner["run_dir"])
    return run_dir if run_dir.is_absolute() else Path(sweep_dir) / run_dir
