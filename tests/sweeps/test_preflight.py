"""Fail fast: every problem of every trial config is reported in one message before anything trains."""

from __future__ import annotations

import pytest

from errors import ConfigError
from sweeps import preflight
from sweeps import sweep as sweep_mod
from sweeps.config import Stage1, Stage2
from tests.sweeps.fakes import FakeTrials, tiny_sweep


def test_bad_network_typo_in_overrides_and_missing_data_are_all_reported_before_training(tmp_path):
    sweep = tiny_sweep(
        tmp_path,
        overrides={"data.num_workers": 0, "data.source": str(tmp_path / "no_such_folder")},
        stage1=Stage1(candidates=[
            {"network": "resnet10t"},
            {"network": "resnet10tt"},                                         # misspelled network
            {"network": "ctnet10", "overrides": {"model": {"lossy": "ce"}}},   # misspelled key inside overrides
        ], defaults={"optimizer": "adam", "image_size": 32}),
        stage2=Stage2(optimizers=["adam"], losses=["ce"], overrides={"trainer.max_epoch": 3}),
    )
    fake = FakeTrials()
    with pytest.raises(ConfigError) as info:
        sweep_mod.run(sweep, execute=fake, preflight=preflight.check)
    message = str(info.value)
    assert "4 problems" in message and "nothing was trained" in message
    assert "stage1.candidates[1] (resnet10tt): model.network.name: unknown network 'resnet10tt'" in message
    assert "Did you mean 'resnet10t'" in message
    assert "stage1.candidates[2] (ctnet10)" in message and "lossy" in message
    assert "stage2 (adam x ce on resnet10t)" in message and "max_epoch" in message
    assert "data:" in message and "no_such_folder" in message
    assert fake.calls == []  # before any training
    assert not (sweep.out_dir / "optuna.db").exists()  # and before any study


def test_problems_of_the_sweep_config_itself_come_together(tmp_path):
    sweep = tiny_sweep(tmp_path, stage1=Stage1(candidates=[{"network": "vgg16", "image_sise": 64}, {"lr": 0.1}]),
                       stage2=Stage2(optimizers=["adamm"], losses=["ce"]))
    with pytest.raises(ConfigError) as info:
        preflight.check(sweep, data=False)
    message = str(info.value)
    assert "unknown key 'image_sise'" in message and "needs a `network`" in message and "unknown optimizer 'adamm'" in message


def test_folds_the_data_cannot_hold_are_reported_before_training(tmp_path):
    """Under cv.folds the data is split as the fold runs will split it: 54 non-test images of a class cannot
    fill 60 folds."""
    from sweeps.config import CrossValidation

    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=60))
    fake = FakeTrials()
    with pytest.raises(ConfigError, match="60-fold cross-validation") as info:
        sweep_mod.run(sweep, execute=fake, preflight=preflight.check)
    assert "data:" in str(info.value) and fake.calls == []
