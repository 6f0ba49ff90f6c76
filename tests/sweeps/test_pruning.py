"""The pruning callback under cross-validation: a fold run is judged against runs of the same fold only
(folds differ in difficulty). Driven with a stand-in trainer on a real SQLite storage; real pruned sweeps
are in test_e2e.py (slow)."""

from __future__ import annotations

from types import SimpleNamespace

import optuna

from runs.files import RunFiles
from sweeps.pruning import OptunaPruning


def run_epochs(callback: OptunaPruning, run_dir, losses: list[float]) -> bool:
    """Feed one validation loss per epoch as Lightning would; returns whether the run was pruned."""
    run_dir.mkdir(parents=True)
    trainer = None
    for epoch, loss in enumerate(losses):
        trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, callback_metrics={"val/loss": loss},
                                  current_epoch=epoch, strategy=SimpleNamespace(broadcast=lambda x: x),
                                  default_root_dir=str(run_dir), should_stop=False)
        callback.on_validation_end(trainer, None)
        if trainer.should_stop:
            break
    callback.on_fit_end(trainer, None)
    return RunFiles(run_dir).pruned.exists()


def test_a_hard_fold_is_judged_against_its_own_fold(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def fold_run(fold: int, losses: list[float], name: str) -> bool:
        callback = OptunaPruning(url, "s/stage1", trial_id=0, pruner="median", fold=fold, direction="minimize")
        return run_epochs(callback, tmp_path / name, losses)

    assert not fold_run(0, [0.3, 0.2, 0.2], "a") and not fold_run(0, [0.3, 0.2, 0.2], "b")  # an easy fold
    # The hard fold's first runs are far above fold 0's median, but fold 0 does not judge them.
    assert not fold_run(1, [0.9, 0.8, 0.8], "c") and not fold_run(1, [0.9, 0.8, 0.8], "d")
    assert fold_run(1, [1.6, 1.5, 1.5], "e")  # hopeless within its own fold: pruned at the first judged epoch
    fold1 = optuna.load_study(study_name="s/stage1/fold1", storage=url)
    states = [t.state.name for t in fold1.get_trials()]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert fold1.get_trials()[0].value == 0.8
