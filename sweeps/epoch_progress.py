"""The trial-side half of `sweeps.progress`: a Lightning callback that streams per-epoch progress to the
sweep worker through a JSON-lines file in the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback, Trainer

from runs.files import PROGRESS


class EpochProgress(Callback):
    """Append `{"epoch", "max_epochs", "metrics", "time"}` to `<run dir>/progress.jsonl` after each
    validation epoch (rank 0 only; sanity checks skipped)."""

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        record = {"epoch": trainer.current_epoch, "max_epochs": trainer.max_epochs, "metrics": metrics,
                  "time": time.time()}
        with open(Path(trainer.default_root_dir) / PROGRESS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
