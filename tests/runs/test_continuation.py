"""Continuing a fit from its checkpoint (`runs.continuation`): stopping after an epoch and continuing ends where
an uninterrupted run of the same seed ends; a broken checkpoint is refused with its reason."""

from __future__ import annotations

import json
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from runs.continuation import Continuation, check_checkpoint, resumable
from sweeps.trials import epoch_table
from tests.conftest import cli_in_process, small_fit_args

# Augmentation on (demo.yaml's Affine + brightness), dropout, a step LR schedule that changes the LR after the
# continuation point, and early stopping whose patience count must survive the checkpoint.
SCHEDULED = ["--model.lr_scheduler={class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 3, gamma: 0.5}}",
             "--run.early_stopping_patience=3", "--data.batch_size=32", "--trainer.limit_train_batches=3"]


def fit(tmp_path, name: str, *extra: str, epochs: int = 4) -> int:
    return cli_in_process("fit", *small_fit_args(tmp_path / "a", tmp_path / "runs", *SCHEDULED,
                                                 f"--run.dir={tmp_path / name}", *extra, epochs=epochs))


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow  # three fits: ~15 s on an idle 2-core machine
def test_stopping_after_epoch_2_and_continuing_to_4_ends_where_an_uninterrupted_run_ends(tmp_path, capsys):
    assert fit(tmp_path, "whole") == 0
    assert fit(tmp_path, "parts", "--run.until_epoch=2") == 0
    parts = tmp_path / "parts"
    assert epoch_table(parts)["epoch"].to_list() == [0, 1]  # it stopped after 2 of its 4 epochs
    assert json.loads((parts / "continuation.json").read_text())["stopped_by"] == "until_epoch"
    assert torch.load(parts / "checkpoints" / "last.ckpt", weights_only=False)["lr_schedulers"][0]["base_lrs"]
    assert cli_in_process("fit", "--config", str(parts / "config.yaml"), "--run.until_epoch=null",
                          "--ckpt_path", str(parts / "checkpoints" / "last.ckpt")) == 0

    status = json.loads((parts / "continuation.json").read_text())
    assert (status["epochs"], status["continued_from_epoch"], status["stopped_by"]) == (4, 2, "max_epochs")
    whole, continued = epoch_table(tmp_path / "whole"), epoch_table(parts)
    assert continued["epoch"].to_list() == [0, 1, 2, 3]  # every epoch once in one metrics.csv
    # On CPU with num_workers 0 the continued run replays the same operations on the same numbers in the same
    # order (generator states restored, the same batches and augmentations), so the results are bit-identical;
    # 1e-6 leaves room only for a float32 reduction order that differs between two processes' thread pools,
    # far below the ~1e-2 an epoch's different shuffle or augmentation would move these metrics.
    val = [c for c in whole.columns if c.startswith("val/")]
    for column in val:
        assert continued[column].to_list() == pytest.approx(whole[column].to_list(), abs=1e-6), column
    a, b = weights(tmp_path / "whole"), weights(parts)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_a_truncated_checkpoint_is_refused_and_a_trial_falls_back_to_training_from_scratch(trained_run, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    cut = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed mid-write
    (cut.parent / "best.ckpt").write_bytes(b"stale")
    assert check_checkpoint(last) is None
    assert check_checkpoint(cut) is not None
    with pytest.warns(UserWarning, match="cannot continue from .*last.ckpt .*training this run from scratch"):
        assert resumable(cut, tmp_path / "run") is None
    assert not list(cut.parent.glob("*.ckpt"))  # a fresh fit must not find the stale best/last checkpoints


def test_a_moved_run_keeps_its_best_score_when_it_continues(trained_run, tmp_path):
    """A sweep's retry takes over the interrupted attempt's folder under a new name: the checkpoint's saved
    folder follows it, so ModelCheckpoint restores its best score instead of forgetting it (and letting the
    first epoch after continuing replace a better best.ckpt)."""
    import os
    import shutil

    from lightning.pytorch.callbacks import ModelCheckpoint

    moved = tmp_path / "trial-7"
    shutil.copytree(trained_run / "checkpoints", moved / "checkpoints")
    last = moved / "checkpoints" / "last.ckpt"
    assert resumable(last, moved) == str(last)
    states = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    saved = [v for k, v in states.items() if k.startswith("ModelCheckpoint") and v.get("best_model_score") is not None]
    assert saved and all(v["dirpath"] == os.path.realpath(moved / "checkpoints") for v in saved)
    assert all(v["best_model_path"].startswith(os.path.realpath(moved)) for v in saved)
    callback = ModelCheckpoint(dirpath=moved / "checkpoints", monitor=saved[0]["monitor"])
    callback.load_state_dict(saved[0])
    assert callback.best_model_score == saved[0]["best_model_score"]


def test_fit_refuses_an_unreadable_ckpt_path_with_one_line(tmp_path, capsys):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 cut short")
    assert fit(tmp_path, "r", "--ckpt_path", str(bad), epochs=1) != 0
    err = capsys.readouterr().err
    assert f"--ckpt_path {bad}: cannot continue from it" in err and "Traceback" not in err


def test_until_epoch_beyond_max_epochs_is_a_config_error(tmp_path, capsys):
    assert fit(tmp_path, "r", "--run.until_epoch=5", epochs=4) != 0
    assert "run.until_epoch is 5 but trainer.max_epochs is 4" in capsys.readouterr().err


def test_metrics_of_an_epoch_cut_short_are_dropped_on_continuing(tmp_path):
    from runs.continuation import keep_epochs_through

    path = tmp_path / "metrics.csv"
    pl.DataFrame({"epoch": [0, 0, 1, 2], "step": [1, 2, 3, 4], "val/loss": [1.0, None, 0.5, None]}).write_csv(path)
    keep_epochs_through(path, 1)
    assert pl.read_csv(path)["epoch"].to_list() == [0, 0, 1]
    keep_epochs_through(path, None)
    assert not path.exists()


def test_continuing_an_early_stopped_run_trains_nothing_more(capsys):
    stopped = EarlyStopping(monitor="val/loss", patience=2)
    stopped.stopped_epoch = 5  # restored from the checkpoint: early stopping ended the run after epoch 6
    trainer = SimpleNamespace(callbacks=[stopped], should_stop=False)
    continuation = Continuation(until_epoch=None)
    continuation.continued_from = 5
    continuation.on_train_start(trainer, None)
    assert trainer.should_stop and "early stopping ended this run after epoch 6" in capsys.readouterr().out
    running = SimpleNamespace(callbacks=[EarlyStopping(monitor="val/loss", patience=2)], should_stop=False)
    continuation.on_train_start(running, None)
    assert not running.should_stop


@pytest.mark.slow  # two fits
def test_a_trial_given_a_truncated_checkpoint_trains_from_scratch_with_a_warning(tmp_path, recwarn):
    import yaml

    from sweeps import jobs

    assert fit(tmp_path, "r", epochs=1) == 0
    run = tmp_path / "r"
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])  # killed mid-write, on a file system without atomic renames
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ckpt_path"], config["trainer"]["max_epochs"] = str(last), 2
    jobs.fit({"config": config})
    assert any("cannot continue from" in str(w.message) and "training this run from scratch" in str(w.message)
               for w in recwarn)
    assert epoch_table(run)["epoch"].to_list() == [0, 1]  # both epochs trained, once
    status = json.loads((run / "continuation.json").read_text())
    assert status["continued_from_epoch"] is None and status["stopped_by"] == "max_epochs"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1
