"""Optuna pruning inside a trial's Lightning run, safe under DDP.

Rank 0 reports the epoch's value to the Optuna trial and asks the stage's pruner; the decision is
broadcast so every rank stops at the same epoch (raising on one rank only would hang the others).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, Trainer

from runs.files import PRUNED, RunFiles


class OptunaPruning(Callback):
    """Report `monitor` each validation epoch and stop the run when the stage's pruner says so.

    Args:
        storage: the Optuna storage URL.
        study_name: the stage's study.
        trial_id: the Optuna trial id this run belongs to.
        monitor: the metric reported (the stage's objective).
        pruner: the sweep's pruner ("median" or "hyperband"); Optuna does not store it with the study.
    """

    def __init__(self, storage: str, study_name: str, trial_id: int, monitor: str = "val/loss",
                 pruner: str = "median"):
        self.storage = storage
        self.study_name = study_name
        self.trial_id = trial_id
        self.monitor = monitor
        self.pruner = pruner
        self._trial = None

    def _optuna_trial(self):
        if self._trial is None:
            import optuna

            from sweeps.coordinator import make_pruner, make_storage

            study = optuna.load_study(study_name=self.study_name, storage=make_storage(self.storage),
                                      pruner=make_pruner(self.pruner))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                trial = self._optuna_trial()
                trial.report(float(value), step=trainer.current_epoch)
                prune = trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                RunFiles(Path(trainer.default_root_dir)).write_json(PRUNED, {"epoch": trainer.current_epoch, "monitor": self.monitor})
