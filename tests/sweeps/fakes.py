"""In-process stand-ins for a trial process: they write what a real trial writes (metrics.csv, model.json,
config.yaml, progress.jsonl) in milliseconds, so the sweep's own logic is tested without training."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import polars as pl
import yaml

from runs.files import PROGRESS, RunFiles
from sweeps import isolation
from sweeps.config import Selection, Stage1, Stage2, SweepConfig
from tests.conftest import REPO

# Validation loss per network: resnet10t wins stage 1; within stage 2, adam + ce wins.
LOSS = {"resnet10t": 0.3, "ctnet10": 0.6, "mobilenetv4_conv_small": 0.5}
OPT = {"Adam": 0.0, "RMSprop": 0.05}
CRITERION = {"ce": 0.0, "mse": 0.02}


def tiny_sweep(tmp_path: Path, **changes) -> SweepConfig:
    """Two candidates, a 2x2 stage-2 grid, no winner test, no W&B."""
    values = dict(
        name="t", base_config=str(REPO / "configs" / "demo.yaml"), root=str(tmp_path / "sweeps"),
        overrides={"data.num_workers": 0, "data.artifacts_dir": str(tmp_path / "artifacts")},
        stage1=Stage1(candidates=[{"network": "resnet10t"}, {"network": "ctnet10"}],
                      defaults={"optimizer": "adam", "loss": "ce", "max_epochs": 2, "image_size": 32}),
        stage2=Stage2(optimizers=["adam", "rmsprop"], losses=["ce", "mse"]),
        wandb="disabled", test_winner=False, heartbeat_seconds=1.0,
        selection=Selection(rule="metric", metric="val/loss", direction="minimize"),
    )
    values.update(changes)
    return SweepConfig(**values)


def no_preflight(sweep: SweepConfig) -> None:
    """Stands in for the preflight (which parses every trial config with the fit parser: seconds)."""
    return None


def killed_by_sigkill(run_dir: Path) -> isolation.Outcome:
    """A real child process that dies by SIGKILL (as under the OOM killer), classified as the sweep does."""
    proc = mp.get_context("fork").Process(target=_kill_self)
    proc.start()
    proc.join()
    return isolation.outcome_of(run_dir / ".fit_result.json", proc.exitcode, run_dir / "fit.log")


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FakeTrials:
    """Callable like `jobs.execute`: records each config and writes a finished run.

    Args:
        outcomes: network name -> a list of outcomes, one per call ("ok" trains; "interrupted" runs a child
            killed by SIGKILL; "failed" an error), then it trains normally.
        fold_loss: (network, fold) -> an amount added to its validation loss on that fold.
    """

    def __init__(self, outcomes: dict[str, list[str]] | None = None, fold_loss: dict[tuple[str, int], float] | None = None):
        self.outcomes = {k: list(v) for k, v in (outcomes or {}).items()}
        self.fold_loss = fold_loss or {}  # (network, fold) -> added to its validation loss on that fold
        self.calls: list[tuple[str, str, str]] = []
        self.configs: list[dict] = []

    def __call__(self, cfg: dict, run_dir: Path) -> isolation.Outcome:
        model = cfg["model"]
        name, opt, loss = model["network"]["name"], model["optimizer"]["class_path"].rsplit(".", 1)[-1], model["loss"]
        self.calls.append((name, opt, loss))
        self.configs.append(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        pending = self.outcomes.get(name) or []
        kind = pending.pop(0) if pending else "ok"  # "ok": this call trains normally
        if kind == "interrupted":
            return killed_by_sigkill(run_dir)
        if kind != "ok":
            return isolation.Outcome("failed", "ValueError: this network always fails")
        epochs = (cfg.get("run") or {}).get("until_epoch") or cfg["trainer"]["max_epochs"]
        fold = ((cfg.get("data") or {}).get("split") or {}).get("fold")
        val_loss = LOSS[name] + OPT[opt] + CRITERION[loss] + self.fold_loss.get((name, fold), 0.0)
        rows = [{"epoch": e, "step": e, "val/loss": val_loss + 0.1 * (epochs - 1 - e), "val/acc": 1 - val_loss,
                 "val/sensitivity": 0.5, "val/specificity": 0.5, "train/acc": 1 - val_loss, "val/overfit": 0.0} for e in range(epochs)]
        run = RunFiles(run_dir)
        pl.DataFrame(rows).write_csv(run.metrics)
        run.write_json(run.model_info.name, {"num_parameters": 1000})
        run.config.write_text(yaml.safe_dump(cfg))
        run.checkpoints.mkdir(exist_ok=True)
        run.last_checkpoint.write_bytes(b"")  # continued from by a promoted rung (`sweeps.schedule`)
        with open(run / PROGRESS, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"epoch": r["epoch"], "max_epochs": epochs, "metrics": {"val/loss": r["val/loss"]}}) + "\n")
        write_val_predictions(run, cfg, 1 - val_loss)
        return isolation.Outcome("ok")


def write_val_predictions(run: RunFiles, cfg: dict, acc: float, n_images: int = 60, folds_test: int = 12) -> None:
    """val_predictions.parquet and train_eval.json as `runs.train_eval` writes them: the validation images of
    the run's fold (images 12..59 cut into `folds` parts; without folds, images 12..35), two classes, right on
    a fraction `acc` of them."""
    split = (cfg.get("data") or {}).get("split") or {}
    folds, fold = split.get("folds", 0), split.get("fold")
    if fold == "all":
        return
    pool = list(range(folds_test, n_images))
    images = pool[fold::folds] if folds else pool[: len(pool) // 2]
    targets = [i % 2 for i in images]
    right = [k < round(acc * len(images)) for k in range(len(images))]
    p1 = [(0.8 if t else 0.2) if ok else (0.2 if t else 0.8) for t, ok in zip(targets, right, strict=True)]
    pl.DataFrame({"path": [f"img{i:03d}.png" for i in images], "patient_id": [f"p{i // 2}" for i in images],
                  "target": targets, "p_a": [1 - p for p in p1], "p_b": p1}).write_parquet(run / "val_predictions.parquet")
    run.write_json("train_eval.json", {"metrics": {}, "n_train": len(pool) - len(images), "n_val": len(images)})
