"""Optuna pruning inside a trial's Lightning run, safe under DDP.

Rank 0 reports the epoch's value to the Optuna trial and asks the stage's pruner; the decision is
broadcast so every rank stops at the same epoch (raising on one rank only would hang the others).

Under cross-validation pruning is per fold: folds differ in difficulty, so a fold run is compared only with
runs of the same fold. Each fold has its own pruning study in the same storage (`<stage study>/fold<k>`),
in which every fold run is one trial (`Study.ask`, then `tell` when the run ends); the stage's own trial
still records the run and is marked pruned when its pruning trial is.
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
        fold: the run's cross-validation fold: judged against the same fold's runs only (None: no folds).
        direction: "minimize" or "maximize" for `monitor` (the fold's pruning study needs it).
    """

    def __init__(self, storage: str, study_name: str, trial_id: int, monitor: str = "val/loss",
                 pruner: str = "median", fold: int | None = None, direction: str = "minimize"):
        self.storage = storage
        self.study_name = study_name
        self.trial_id = trial_id
        self.monitor = monitor
        self.pruner = pruner
        self.fold = fold
        self.direction = direction
        self._trial = None
        self._last: float | None = None

    def _optuna_trial(self):
        if self._trial is None:
            import optuna

            from sweeps.coordinator import make_pruner, make_storage

            storage, pruner = make_storage(self.storage), make_pruner(self.pruner)
            if self.fold is None:
                study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
                self._trial = optuna.trial.Trial(study, self.trial_id)
            else:
                study = optuna.create_study(study_name=f"{self.study_name}/fold{self.fold}", storage=storage,
                                            pruner=pruner, direction=self.direction, load_if_exists=True)
                self._trial = study.ask()
                self._trial.set_user_attr("stage_trial_id", self.trial_id)
        return self._trial

    def on_fit_end(self, trainer: Trainer, pl_module) -> None:
        """A fold's pruning trial is finished with the run: pruned, or complete with its last value."""
        if self.fold is None or self._trial is None or not trainer.is_global_zero:
            return
        from optuna.trial import TrialState

        study = self._trial.study
        if RunFiles(Path(trainer.default_root_dir)).pruned.exists():
            study.tell(self._trial, state=TrialState.PRUNED)
        elif self._last is not None:
            study.tell(self._trial, self._last)
        else:
            study.tell(self._trial, state=TrialState.FAIL)

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                trial = self._optuna_trial()
                self._last = float(value)
                trial.report(self._last, step=trainer.current_epoch)
                prune = trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                RunFiles(Path(trainer.default_root_dir)).write_json(PRUNED, {"epoch": trainer.current_epoch, "monitor": self.monitor})
