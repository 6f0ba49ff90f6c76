"""Continuing an interrupted trial from its last epoch instead of epoch 0.

A trial stopped by a signal, a kill -9 of the sweep, a dead worker or a preempted job is *interrupted*
(`sweeps.coordinator`); the rerun enqueues its grid point again and a new Optuna trial (a new number) trains
it. That new trial looks up the grid point's previous attempt in the study, by grid point identity (the
stage's study, the point's keys, its repeat and fold: `Stage.key`, which covers any key a stage adds), never
by trial number. When that attempt was interrupted, trained the same fit config (same seed and fold: the
`fit_config` fingerprint below; `run.until_epoch` aside, which only says where a fit pauses) and left a
`checkpoints/last.ckpt`, its run folder moves to the new trial's name and the fit continues from that
checkpoint (`ckpt_path`, see `runs.continuation`): at most the epoch in progress is lost. Otherwise the grid
point trains from scratch in a new folder, and the rerun says why.

Torch-free, like the rest of the coordinator side: a checkpoint cut short is recognised here by its missing
zip directory (`torch.save` writes a zip file, directory last); the trial process reads it fully before
continuing and falls back to training from scratch if it still cannot (`runs.continuation.resumable`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from runs.files import RunFiles
from sweeps import coordinator as coord
from sweeps.log import log

FINGERPRINT = "fit_config"  # trial user attribute: the fingerprint of the grid point's fit config and seed
CONTINUES = "continues"  # trial user attribute: the run folder (relative to the sweep folder) it took over


def fingerprint(cfg: dict[str, Any], seed: int) -> str:
    """A short hash of a grid point's fit config and seed; `run.until_epoch` (where a fit pauses) is left out."""
    run = {k: v for k, v in (cfg.get("run") or {}).items() if k != "until_epoch"}
    text = json.dumps({**cfg, "run": run, "seed_everything": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Previous:
    """An interrupted attempt of a grid point whose fit can be continued.

    Attributes:
        number: its trial number.
        run_dir: its run folder, relative to the sweep folder.
    """

    number: int
    run_dir: str


def previous_attempt(ss: coord.StageStudy, sweep_dir: Path, params: dict[str, Any], fit_config: str) -> Previous | None:
    """The grid point's latest interrupted attempt, if its fit can be continued (else None, saying why)."""
    key = ss.stage.key(params)
    attempts = [t for t in ss.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.user_attrs.get("duplicate_of") is None and ss.stage.key(coord.grid_params(t)) == key]
    if not attempts:
        return None
    last = max(attempts, key=lambda t: t.number)
    relative = last.user_attrs.get("run_dir")
    ckpt = RunFiles(Path(sweep_dir) / relative).last_checkpoint if relative else None
    why = None
    if not coord.is_interrupted(last):
        why = "it failed with an error"  # retried with --retry_failed: a fresh start, not the same error again
    elif ckpt is None or not ckpt.is_file():
        why = "it finished no epoch"
    elif last.user_attrs.get(FINGERPRINT) != fit_config:
        why = "its fit config or seed differs from the sweep's now"
    elif not zipfile.is_zipfile(ckpt):
        why = f"{ckpt} is cut short or unreadable"
    if why is not None:
        log.info(f"[sweep] {ss.stage.name}: trial {last.number} of this grid point is not continued ({why}); "
                 "training it from scratch")
        return None
    return Previous(last.number, relative)


def take_over(sweep_dir: Path, previous: Previous, run_dir: Path) -> None:
    """Move the previous attempt's run folder to `run_dir` (the new trial's), checkpoints, metrics and all.

    Exactly-once claiming means no other worker trains this grid point now, and the interrupted attempt's
    process is gone, so nothing writes into the folder while it moves.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(Path(sweep_dir) / previous.run_dir, run_dir)
