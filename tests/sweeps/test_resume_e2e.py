"""kill -9 of a local sweep mid-trial, then the same command again: the trial continues from its last epoch
checkpoint instead of epoch 0 (slow: it trains, in processes, and is killed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from sweeps.trials import epoch_table
from tests.conftest import REPO, run_cli
from tests.sweeps.test_e2e import write_sweep

pytestmark = pytest.mark.slow
EPOCHS = 5


def test_a_sigkilled_sweep_continues_its_trial_from_the_last_epoch(tmp_path, shared_artifacts):
    cfg = write_sweep(tmp_path, shared_artifacts, test_winner=False, stage1={
        "candidates": [{"network": "ctnet10"}],
        "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 16, "max_epochs": EPOCHS, "image_size": 32}},
        stage2={"optimizers": ["adam"], "losses": ["ce"], "overrides": {"max_epochs": 1}})
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    first = tmp_path / "sweeps" / "t" / "trials" / "stage1" / "000-ctnet10-r0"
    deadline = time.time() + 400
    while time.time() < deadline and not ((first / "progress.jsonl").exists()
                                          and len((first / "progress.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep, mid-trial: no handler runs, nothing is recorded
    killed_at = time.time()
    proc.communicate(timeout=60)
    assert (first / "checkpoints" / "last.ckpt").exists(), "the trial never finished an epoch"

    rerun = run_cli("sweep", "--config", str(cfg), timeout=1200)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "continues trial 0's run (trials/stage1/000-ctnet10-r0)" in rerun.stdout, rerun.stdout[-3000:]
    (run_dir,) = (tmp_path / "sweeps" / "t" / "trials" / "stage1").glob("*-ctnet10-r0")  # the one folder, moved
    assert not first.exists()
    resumed = re.findall(r"\[run\] continuing from the checkpoint of epoch (\d+) of 5", (run_dir / "fit.log").read_text())
    assert len(resumed) == 1 and int(resumed[0]) >= 1, resumed
    # Which epochs each attempt trained, from the per-epoch records both appended to progress.jsonl.
    records = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    before = [r["epoch"] for r in records if r["time"] < killed_at]
    after = [r["epoch"] for r in records if r["time"] > killed_at]
    assert before[0] == 0 and len(before) >= 2
    assert after == list(range(int(resumed[0]), EPOCHS)), (before, after)  # not from 0: from its checkpoint on
    assert after[0] >= before[-1]  # at most the epoch in progress at the kill is trained again
    assert epoch_table(run_dir)["epoch"].to_list() == list(range(EPOCHS))  # one metrics row per epoch, once
