"""Continuing a fit from its checkpoint: stop after an epoch now, continue to a later one later.

A run's `checkpoints/last.ckpt` (Lightning's `ModelCheckpoint(save_last=True)`, written after every epoch)
already holds the weights, optimizer and LR-scheduler states, the epoch and global step and the callbacks'
states (the best score of `ModelCheckpoint`, the patience count of `EarlyStopping`); `trainer.fit(...,
ckpt_path=last.ckpt)` (`cli.py fit --ckpt_path ...`) continues from there. What Lightning leaves out, this
module adds:

- **Random state.** Lightning 2.x saves no random-number-generator state in a checkpoint, so a continued run
  would shuffle and augment its later epochs differently from an uninterrupted run of the same seed.
  `Continuation` saves the python, numpy and torch (CPU and CUDA) generators and the train transform's own
  albumentations generators with every checkpoint and restores them when a fit continues. With
  `data.num_workers: 0` a continued run then retraces the uninterrupted one exactly; with loader workers the
  workers' augmentation streams are their own (persistent workers are seeded once per fit) and a
  continued run draws other, equally distributed augmentations after the point where it continued.
- **Stopping after an epoch.** `run.until_epoch: e` stops the fit once `e` epochs are done (with their
  checkpoint) while everything else stays defined over `trainer.max_epochs`: the LR schedule, warm-up and
  early-stopping patience are exactly those of the full run. Continuing the same run later with a larger
  `run.until_epoch` (or none: to `trainer.max_epochs`) and `ckpt_path=<run>/checkpoints/last.ckpt` ends
  where an uninterrupted run of the same seed would. Successive halving trains its rungs this way.
- **Why it stopped.** `continuation.json` in the run folder says how many epochs are done and what ended
  the fit: `until_epoch` (continue it), `max_epochs` or `early_stopping` (finished: continuing an
  early-stopped run trains nothing more, as an uninterrupted run would not), or `other` (a pruner, a signal).
- **One metrics.csv.** Lightning's CSV logger deletes an existing metrics.csv when it starts; a continued
  run keeps the rows of the epochs its checkpoint holds (and drops those of an epoch that was cut short), so
  the run's table covers every epoch once, as an uninterrupted run's does.

A checkpoint that cannot be read (a copy cut short, a full disk) is refused by `check_checkpoint`
with its reason: `cli.py fit --ckpt_path` stops with that error; a sweep trial retrains from scratch.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from errors import ConfigError
from runs import files
from runs.files import RunFiles

_REQUIRED = ("state_dict", "epoch", "global_step", "loops", "optimizer_states", "callbacks")


def _load(path: str | Path) -> tuple[dict | None, str | None]:
    try:  # weights_only, as LightningCLI itself first reads a `--ckpt_path`: these checkpoints hold no code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises anything from EOFError to RuntimeError on a bad file
        return None, f"{type(e).__name__}: {e}".strip()
    missing = [key for key in _REQUIRED if key not in checkpoint] if isinstance(checkpoint, dict) else list(_REQUIRED)
    return (None, f"not a training checkpoint (no {', '.join(missing)})") if missing else (checkpoint, None)


def check_checkpoint(path: str | Path) -> str | None:
    """Why `path` cannot be continued from (unreadable, truncated, not a training checkpoint), or None.

    Lightning writes checkpoints atomically on local disks (a temporary file, then a rename), but a copy,
    another file system or a full disk can still leave a broken file; it is read once here rather than fail
    deep inside `trainer.fit`.
    """
    return _load(path)[1]


_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


def _follow_move(checkpoint: dict, path: Path, checkpoints: Path) -> None:
    """Point the checkpoint callbacks' saved paths at `checkpoints` when the run folder was moved (a sweep's
    retry takes over the interrupted attempt's folder, `sweeps.resume`), and rewrite `path` if anything changed.

    `ModelCheckpoint.load_state_dict` restores its best score only when the saved `dirpath` equals its own;
    otherwise it warns and forgets it, and the first epoch after continuing would replace a better best.ckpt.
    """
    new = os.path.realpath(checkpoints)
    changed = False
    for state in checkpoint["callbacks"].values():
        old = state.get("dirpath") if isinstance(state, dict) else None
        if not isinstance(old, str) or old == new:
            continue
        for key in _PATHS:
            if isinstance(state.get(key), str) and state[key].startswith(old):
                state[key] = new + state[key][len(old):]
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {(new + k[len(old):] if k.startswith(old) else k): v
                                      for k, v in state["best_k_models"].items()}
        state["dirpath"], changed = new, True
    if changed:
        tmp = path.with_name(path.name + ".moved")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def resumable(ckpt_path: str | Path | None, run_dir: Path) -> str | None:
    """`ckpt_path` if a fit can continue from it (its saved checkpoint folder updated if the run was moved);
    else None, with a warning, after removing the run's stale checkpoints (a fresh fit in the same folder must
    not find them: `ModelCheckpoint` would save `best-v1`)."""
    if ckpt_path is None:
        return None
    checkpoint, reason = (None, "it does not exist") if not Path(ckpt_path).is_file() else _load(ckpt_path)
    checkpoints = RunFiles(run_dir).checkpoints
    if reason is None:
        _follow_move(checkpoint, Path(ckpt_path), checkpoints)
        return str(ckpt_path)
    warnings.warn(f"cannot continue from {ckpt_path} ({reason}); training this run from scratch", stacklevel=2)
    for stale in checkpoints.glob("*.ckpt") if checkpoints.is_dir() else []:
        stale.unlink()
    return None


def check_until_epoch(until_epoch: Any, max_epochs: Any) -> None:
    """Raises ConfigError unless `until_epoch` is None or a whole number of epochs in 1..max_epochs."""
    if until_epoch is None:
        return
    if isinstance(until_epoch, bool) or not isinstance(until_epoch, int) or until_epoch < 1:
        raise ConfigError(f"run.until_epoch is {until_epoch!r}: it must be a whole number of epochs, at least 1, "
                          "or null to train to trainer.max_epochs")
    if isinstance(max_epochs, int) and until_epoch > max_epochs:
        raise ConfigError(f"run.until_epoch is {until_epoch} but trainer.max_epochs is {max_epochs}: the schedule "
                          "is defined over max_epochs; raise --trainer.max_epochs or lower --run.until_epoch")


def _generators(transform: Any) -> list[Any]:
    """The transform and every transform inside it, each holding its own albumentations generators."""
    if transform is None or not hasattr(transform, "random_generator"):
        return []
    return [transform, *[g for t in getattr(transform, "transforms", []) for g in _generators(t)]]


def _plain(numpy_state: tuple) -> tuple:
    """numpy's legacy generator state with its key array as a list (`weights_only` loads refuse arrays)."""
    kind, keys, pos, has_gauss, cached = numpy_state
    return kind, keys.tolist(), int(pos), int(has_gauss), float(cached)


def _early_stopped(trainer: Trainer) -> bool:
    return any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks)


def _train_transform(trainer: Trainer) -> Any:
    return getattr(getattr(trainer, "datamodule", None), "train_transform", None)


class Continuation(Callback):
    """Saves the random state with each checkpoint and restores it on continuing; stops after `until_epoch`.

    Hand-written because Lightning's checkpoints carry no generator state (its fault-tolerant mode, which
    did, was removed in 2.0) and Lightning has no "stop after epoch e, keeping max_epochs" setting.

    Args:
        until_epoch: stop once this many epochs are done (None: at `trainer.max_epochs`).
    """

    def __init__(self, until_epoch: int | None = None):
        self.until_epoch = until_epoch
        self.continued_from: int | None = None  # the epoch (0-based) of the checkpoint this fit continued
        self._restore: dict[str, Any] | None = None
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer  # `state_dict` has no trainer argument; the transform is the datamodule's

    def state_dict(self) -> dict[str, Any]:
        transform = _train_transform(self._trainer) if self._trainer is not None else None
        return {
            # Plain types and tensors only: checkpoints are also read with `torch.load(weights_only=True)`.
            "python": random.getstate(), "numpy": _plain(np.random.get_state()), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "transform": [(g.random_generator.bit_generator.state, g.py_random.getstate())
                          for g in _generators(transform)],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at fit start: after the data module's `setup` seeds the transform, before the first epoch's
        # batches are drawn (Lightning creates that iterator before `on_train_start` hooks run). The sanity
        # check between them draws nothing at random (sequential validation batches, eval mode).
        self._restore = state_dict

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.continued_from = int(checkpoint["epoch"])
        if trainer.is_global_zero:
            print(f"[run] continuing from the checkpoint of epoch {self.continued_from + 1} of {trainer.max_epochs}",
                  flush=True)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            keep_epochs_through(RunFiles(Path(trainer.default_root_dir)).metrics, self.continued_from)
        if self._restore is not None:
            self._restore_generators(trainer, self._restore)
            self._restore = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.continued_from is None:
            return
        if self.until_epoch is not None and self.continued_from + 1 >= self.until_epoch:
            trainer.should_stop = True  # continued to an epoch it has already reached: nothing to train
        if _early_stopped(trainer):  # the checkpoint's EarlyStopping state: an uninterrupted run ended there
            trainer.should_stop = True
            print(f"[run] early stopping ended this run after epoch {self.continued_from + 1}; nothing to continue",
                  flush=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        epochs = trainer.current_epoch
        stopped_by = ("early_stopping" if _early_stopped(trainer) else "max_epochs" if epochs >= trainer.max_epochs
                      else "until_epoch" if self.until_epoch is not None and epochs >= self.until_epoch else "other")
        RunFiles(Path(trainer.default_root_dir)).write_json(files.CONTINUATION, {
            "epochs": epochs, "max_epochs": trainer.max_epochs, "until_epoch": self.until_epoch,
            "continued_from_epoch": None if self.continued_from is None else self.continued_from + 1,
            "stopped_by": stopped_by})

    @staticmethod
    def _restore_generators(trainer: Trainer, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        gens = _generators(_train_transform(trainer))
        if len(gens) == len(state["transform"]):  # the same augmentation pipeline as when it was saved
            for g, (np_state, py_state) in zip(gens, state["transform"], strict=True):
                g.random_generator.bit_generator.state = np_state
                g.py_random.setstate(py_state)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The epoch's checkpoint is written (ModelCheckpoint runs after this callback on the same hook, or
        # before it at validation end), and `max_epochs` stays what schedules and patience are defined over.
        if self.until_epoch is not None and trainer.current_epoch + 1 >= self.until_epoch:
            trainer.should_stop = True


def keep_epochs_through(metrics: Path, epoch: int | None) -> None:
    """Keep the rows of epochs 0..`epoch` of a run's metrics.csv (None: start a new table)."""
    if not metrics.exists():
        return
    if epoch is None:
        metrics.unlink()
        return
    with open(metrics, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], [r for r in reader if r.get("epoch") and int(float(r["epoch"])) <= epoch]
    with open(metrics, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to a metrics.csv that is already there (`Continuation` has trimmed
    it, or removed it for a new fit) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))


class ContinuableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv survives a continued fit (see `_AppendingWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
