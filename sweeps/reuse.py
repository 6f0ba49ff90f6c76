"""No retraining of identical configs: a grid point whose resolved fit config equals a finished trial's reuses
that trial's result and run.

Two runs are the same training when their fit configs, with everything that only names or files the run left
out (its directory, W&B name, group and tags, the pruning callback's trial id), are equal: the config holds
the seed (`seed_everything`, from the repeat) and the fold (`data.split.fold`), so equal configs mean the same
seed and fold. The typical case is stage 2's default pair: `rmsprop + ce` on the stage-1 winner is exactly
the stage-1 winner's run. Every trial records its config's fingerprint (`config_sha`); a claimed trial whose
fingerprint matches a COMPLETE trial of this sweep (either stage) copies that trial's recorded results and
points at its run directory instead of training, and says so: `reused_from` ("stage1/resnet10t-r0"), shown
in the log, the leaderboard and the report. Reused trials cost no time (`seconds` 0), so a budget is not
charged for them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps import coordinator as coord
from sweeps.grid import KINDS

CONFIG_SHA = "config_sha"
REUSED_FROM = "reused_from"
# The run settings that name or file a run but do not change what it trains.
NAMING_RUN_KEYS = ("dir", "name", "wandb", "wandb_group", "wandb_job_type", "wandb_tags")
RESULT_ATTRS = ("metrics", "params", "epoch", "epochs_run", "run_dir", "sweep_dir", "train_seconds")


def fingerprint(cfg: dict[str, Any]) -> str:
    """A hash of what a fit config trains: everything but the run's names, files and pruning trial."""
    trains = {k: v for k, v in cfg.items() if k != "ckpt_path"}  # a continued run ends where an uninterrupted one does
    trains["run"] = {k: v for k, v in (cfg.get("run") or {}).items() if k not in NAMING_RUN_KEYS}
    trainer = dict(cfg.get("trainer") or {})
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    # The pruning callback carries the trial's id and study; a run that finished unpruned trained the same.
    trainer["callbacks"] = [c for c in callbacks if not str((c or {}).get("class_path", "")).endswith("OptunaPruning")]
    trains["trainer"] = trainer
    text = json.dumps(trains, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _studies(ss: coord.StageStudy, sweep_name: str) -> list[tuple[str, optuna.Study]]:
    """This sweep's stage studies in the stage's storage (the current stage's own study included)."""
    names = {s.study_name for s in optuna.get_all_study_summaries(ss.storage, include_best_trial=False)}
    out = []
    for stage in ("stage1", "stage2"):
        name = f"{sweep_name}/{stage}"
        if name == ss.stage.study_name:
            out.append((stage, ss.study))
        elif name in names:
            out.append((stage, optuna.load_study(study_name=name, storage=ss.storage)))
    return out


def find(ss: coord.StageStudy, sweep_name: str, sha: str, number: int) -> tuple[str, FrozenTrial] | None:
    """A COMPLETE trial of this sweep with the same config fingerprint (not trial `number` itself, and not
    itself a reuse: the original run), as (its stage, the trial)."""
    for stage, study in _studies(ss, sweep_name):
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if ua := t.user_attrs:
                if ua.get(CONFIG_SHA) == sha and ua.get("duplicate_of") is None and not (
                        study is ss.study and t.number == number):
                    return stage, t
    return None


def adopt(ss: coord.StageStudy, number: int, source_stage: str, source: FrozenTrial) -> str:
    """Finish trial `number` with `source`'s recorded results and run directory; returns where it came from
    ("stage1/resnet10t-r0")."""
    origin = source.user_attrs.get(REUSED_FROM) or f"{source_stage}/{source_label(source_stage, source)}"
    for key in RESULT_ATTRS:
        if key in source.user_attrs:
            ss.set_attr(number, key, source.user_attrs[key])
    ss.set_attr(number, "seconds", 0.0)
    ss.set_attr(number, REUSED_FROM, origin)
    ss.study.tell(number, source.value)
    return origin


def source_label(stage: str, source: FrozenTrial) -> str:
    """The source trial's run name in its stage ("resnet10t-r0", "adam-ce-r0-f1")."""
    params = coord.grid_params(source)
    point = "-".join(str(params[k]) for k in KINDS[stage].keys if k in params)
    fold = f"-f{params['fold']}" if params.get("fold") is not None else ""
    return f"{point}-r{params.get('repeat', 0)}{fold}"
