"""An interrupted trial's retry continues the grid point's run from its last epoch checkpoint (`sweeps.resume`):
found by grid point, not trial number; not when the checkpoint is cut short or the fit config changed. In-process
with fake trials; the process-level kill -9 and the epochs really trained are in test_e2e.py (slow)."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeps import grid, trials, worker
from tests.sweeps.fakes import FakeTrials, killed_by_sigkill, tiny_sweep


class KilledAfterAnEpoch(FakeTrials):
    """ctnet10's first attempt leaves an epoch's checkpoint (`cut`: one cut short) and dies by SIGKILL."""

    def __init__(self, cut: bool = False):
        super().__init__()
        self.cut, self.killed = cut, False

    def __call__(self, cfg: dict, run_dir: Path):
        if cfg["model"]["network"]["name"] != "ctnet10" or self.killed:
            return super().__call__(cfg, run_dir)
        self.killed = True
        last = run_dir / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        with zipfile.ZipFile(last, "w") as z:  # torch.save's format: a zip file, its directory last
            z.writestr("archive/data.pkl", b"x" * 1000)
        if self.cut:
            last.write_bytes(last.read_bytes()[:500])
        (run_dir / "epoch0.txt").write_text("trained by the first attempt")
        return killed_by_sigkill(run_dir)


def run_stage1(sweep, execute) -> None:
    """Stage 1 alone (what is tested happens there; a whole sweep costs seconds more)."""
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    configs = trials.TrialConfigs(sweep)
    worker.run_stage(sweep, grid.stage1(sweep, list(configs.candidates), configs.shared), None, configs, execute)


def stage1_trials(sweep):
    return optuna.load_study(study_name="t/stage1", storage=sweep.storage_url).get_trials()


def ctnet_calls(fake: FakeTrials) -> list[dict]:
    return [c for c in fake.configs if c["model"]["network"]["name"] == "ctnet10"]


@pytest.fixture
def interrupted(tmp_path):
    def make(cut: bool = False):
        sweep = tiny_sweep(tmp_path)
        run_stage1(sweep, KilledAfterAnEpoch(cut))
        (killed,) = [t for t in stage1_trials(sweep) if t.state == TrialState.FAIL]
        return sweep, killed
    return make


def test_the_retry_continues_the_interrupted_run_from_its_last_checkpoint(interrupted, capsys):
    sweep, killed = interrupted()
    old = sweep.out_dir / killed.user_attrs["run_dir"]
    fake = FakeTrials()
    run_stage1(sweep, fake)
    (retry,) = [t for t in stage1_trials(sweep) if t.number > killed.number and t.state == TrialState.COMPLETE]
    new = sweep.out_dir / retry.user_attrs["run_dir"]
    assert new != old and not old.exists()  # a new trial number, the same run: its folder moved
    assert (new / "epoch0.txt").read_text() == "trained by the first attempt"
    assert retry.user_attrs["continues"] == killed.user_attrs["run_dir"]
    (cfg,) = ctnet_calls(fake)
    assert cfg["ckpt_path"] == str(new / "checkpoints" / "last.ckpt")
    assert f"continues trial {killed.number}'s run" in capsys.readouterr().out
    assert all("ckpt_path" not in c for c in fake.configs if c is not cfg)  # nothing else continues


def test_a_checkpoint_cut_short_is_not_continued(interrupted, capsys):
    sweep, killed = interrupted(cut=True)
    fake = FakeTrials()
    run_stage1(sweep, fake)
    (cfg,) = ctnet_calls(fake)
    assert "ckpt_path" not in cfg and (sweep.out_dir / killed.user_attrs["run_dir"]).exists()
    assert "is cut short or unreadable); training it from scratch" in capsys.readouterr().out


def test_a_changed_fit_config_is_trained_from_scratch(interrupted, capsys):
    sweep, _ = interrupted()
    changed = replace(sweep, stage1=replace(sweep.stage1, defaults={**sweep.stage1.defaults, "max_epochs": 3}))
    fake = FakeTrials()
    run_stage1(changed, fake)
    (cfg,) = ctnet_calls(fake)
    assert "ckpt_path" not in cfg
    assert "its fit config or seed differs from the sweep's now" in capsys.readouterr().out
