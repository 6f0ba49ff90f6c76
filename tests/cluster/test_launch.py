"""A SLURM launch without a cluster: what is refused before submission, what submitit is asked to submit (through
a stand-in `sbatch` that records its scripts), the follower's display, and the trial environment inside a job."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from errors import ConfigError
from sweeps import coordinator as coord
from sweeps import launch
from sweeps.cli import launch_flags
from sweeps.config import SweepConfig
from sweeps.isolation import trial_environ
from tests.conftest import REPO, cli_in_process

FAKE_SBATCH = """#!/bin/sh
# Records each submitted script and answers like sbatch; job ids count up from 100.
n=$(ls "{folder}" | wc -l)
cp "$1" "{folder}/$((100 + n)).sh"
echo "Submitted batch job $((100 + n))"
"""


def sweep_config(tmp_path: Path, **changes) -> SweepConfig:
    values = {
        "name": "c", "base_config": str(REPO / "configs" / "demo.yaml"), "root": str(tmp_path / "sweeps"),
        "storage": f"journal://{tmp_path / 'shared' / 'c.log'}", "wandb": "disabled",
        "stage1": {"candidates": [{"network": "resnet10t"}, {"network": "ctnet10"}],
                   "defaults": {"optimizer": "adam", "loss": "ce", "max_epochs": 1, "image_size": 32}},
        "stage2": {"optimizers": ["adam"], "losses": ["ce"]},
        "launcher": {"kind": "slurm", "workers": 2, "partition": "gpu", "time": "02:00:00", "gpus_per_worker": 1,
                     "setup": ["module load cuda/12.4"], "sbatch": {"constraint": "a100"}},
    }
    values.update(changes)
    return SweepConfig.from_dict(values)


def test_launcher_flags_in_the_sweep_vocabulary():
    args, detach, follow = launch_flags(["--config", "s.yaml", "--launcher", "slurm", "--detach",
                                         "--launcher.partition", "debug"])
    assert args == ["--config", "s.yaml", "--launcher.kind", "slurm", "--launcher.partition", "debug"]
    assert detach and not follow
    assert launch_flags(["--launcher=slurm", "--follow"])[1:] == (False, True)


@pytest.mark.parametrize("changes, message", [
    ({"storage": None}, "is SQLite, which workers on several nodes cannot share.*journal:///.*postgresql://"),
    ({"storage": "redis://host"}, "not a storage a SLURM launch can use"),
    ({"workers": 3}, "set launcher.workers"),
    ({"overrides": {"trainer": {"num_nodes": 2}}}, "trainer.num_nodes: 2.*one node"),
    ({"overrides": {"trainer": {"devices": 2}}}, "launcher.gpus_per_worker: 1, but candidate resnet10t trains on 2"),
    ({"launcher": {"kind": "slurm", "time": "2h"}}, "launcher.time: '2h'"),
])
def test_what_cannot_run_on_the_cluster_is_refused_before_submission(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        launch.prepare(sweep_config(tmp_path, **changes))
    assert not (tmp_path / "sweeps" / "c" / launch.RECORD).exists()


def test_cli_refuses_sqlite_with_one_error_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    cfg = sweep_config(tmp_path).to_dict()
    cfg.pop("storage")
    path.write_text(yaml.safe_dump(cfg))
    assert cli_in_process("sweep", "--config", str(path), "--launcher", "slurm") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: storage: 'sqlite:///") and "journal:///" in err[0]


def test_submission_is_one_array_and_a_final_job_after_it(tmp_path, monkeypatch):
    scripts = tmp_path / "submitted"
    scripts.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(FAKE_SBATCH.format(folder=scripts))
    (bindir / "sbatch").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    sweep = sweep_config(tmp_path)
    record = launch.submit(sweep, sweep.launcher.slurm())
    assert record["array"] == "100" and record["tasks"] == ["100_0", "100_1"] and record["final"] == "101"
    assert json.loads((sweep.out_dir / launch.RECORD).read_text()) == record
    array, final = (scripts / "100.sh").read_text(), (scripts / "101.sh").read_text()
    for line in ("#SBATCH --array=0-1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=120", "#SBATCH --constraint=a100",
                 "export HF_HUB_OFFLINE=1", "module load cuda/12.4", f"export PYTHONPATH={REPO}"):
        assert line in array, line
    assert "#SBATCH --dependency=afterany:100" in final and "--array" not in final
    assert "export HF_HUB_OFFLINE=1" in final and "#SBATCH --gpus-per-node=1" in final


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
def test_trials_in_a_slurm_worker_are_not_taken_for_srun_tasks(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    job = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NAME": "medsel-c", "CUDA_VISIBLE_DEVICES": "2,3"}
    for key, value in job.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()  # the worker itself is an srun task (submitit launches it so)
    env = trial_environ()
    assert env["SLURM_JOB_ID"] == "7" and env["CUDA_VISIBLE_DEVICES"] == "2,3"  # the job's GPUs, as given
    for key in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key)
    assert not SLURMEnvironment.detect()  # so Lightning launches a 2-device trial's ranks itself


def test_follower_shows_the_local_display_from_the_storage(tmp_path, capsys):
    sweep = sweep_config(tmp_path)
    stage = coord.Stage("stage1", "c/stage1", [{"candidate": c, "repeat": 0} for c in ("resnet10t", "ctnet10")],
                        "val/loss", "minimize")
    ss = coord.open_study(coord.make_storage(sweep.storage_url), stage, coord.make_pruner("none"))
    coord.ensure_grid(ss)
    first, second = coord.claim(ss), coord.claim(ss)
    run_dir = sweep.out_dir / "trials" / "stage1" / "000-resnet10t-r0"
    run_dir.mkdir(parents=True)
    ss.set_attr(first.number, "run_dir", "trials/stage1/000-resnet10t-r0")
    record = {"tasks": ["1_0", "1_1"], "final": "2", "workers": 2}
    follower = launch.Follower(sweep, record)
    watch = launch.StageWatch(follower, ss, launch._stage_progress(stage, 0, 2))
    watch.poll()
    (run_dir / "progress.jsonl").write_text(json.dumps({"epoch": 0, "max_epochs": 1, "metrics": {"val/loss": 1.25}}) + "\n")
    ss.set_attr(first.number, "seconds", 12.0)
    ss.study.tell(first.number, 1.25)
    ss.set_attr(second.number, "run_dir", "trials/stage1/001-ctnet10-r0")
    ss.set_attr(second.number, "fail_reason", "interrupted: worker vm:12 stopped")
    ss.study.tell(second.number, state=TrialState.FAIL)
    watch.poll()
    watch.close()
    out = capsys.readouterr().out
    assert f"[sweep] stage1 trial 0 resnet10t-r0 -> {run_dir} (log: fit.log)" in out
    assert "[sweep] stage1 trial 0 resnet10t-r0: epoch 1/1 val/loss=1.2500" in out
    assert "[sweep] stage1 trial 0 done in 12s: val/loss=1.2500" in out
    assert "[sweep] stage1 trial 1 INTERRUPTED: interrupted: worker vm:12 stopped" in out
    assert "[sweep] stage1: 2/2 trials" in out
    assert follower.first_epoch_at is not None
    assert optuna.load_study(study_name="c/stage1", storage=ss.storage).trials[0].state == TrialState.COMPLETE


def test_ctrl_c_stops_the_follower_only_and_says_how_to_cancel(tmp_path, monkeypatch, capsys):
    import signal

    from runs.interrupts import Interrupted

    sweep = sweep_config(tmp_path)
    sweep.out_dir.mkdir(parents=True)
    (sweep.out_dir / launch.RECORD).write_text(json.dumps({"array": "5", "tasks": ["5_0", "5_1"], "final": "6",
                                                           "workers": 2}))
    cancelled = []
    monkeypatch.setattr("subprocess.run", lambda *a, **k: cancelled.append(a))  # scancel would show up here

    def pressed(self):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(launch.Follower, "run", pressed)
    assert launch.main(sweep, detach=False, follow_only=True, command="python cli.py sweep --config s.yaml") == 130
    out = capsys.readouterr().out
    assert "the jobs keep running" in out and "`python cli.py sweep --config s.yaml --follow`" in out
    assert "cancel them with `scancel 5 6`" in out and not cancelled


def test_worker_pinning_maps_into_the_gpus_slurm_gave_the_job(monkeypatch):
    from sweeps.worker import gpu_env, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # what SLURM sets for a job given GPUs 4 and 6
    assert visible_gpus() == ["4", "6"]
    assert [gpu_env(w, 1, visible_gpus()) for w in (0, 1)] == [{"CUDA_VISIBLE_DEVICES": "4"},
                                                               {"CUDA_VISIBLE_DEVICES": "6"}]
    assert gpu_env(0, 2, visible_gpus()) == {"CUDA_VISIBLE_DEVICES": "4,6"}  # a 2-device trial: both, no others
