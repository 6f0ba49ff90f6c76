"""Whole sweeps through `cli.py sweep --launcher slurm` against the real single-node SLURM (`.ci/start_slurm.sh`):
the same winner and trial set as a local sweep, each grid point trained once, a cancelled worker's trial retried,
and nothing submitted when the cluster refuses the settings. Tiny: 32x32 phantoms, 1-2 epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sweeps import coordinator as coord
from tests.cluster.conftest import queued
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
FAST = {"run": {"early_stopping_patience": None}, "trainer": {"enable_model_summary": False}}


def write_sweep(folder: Path, artifacts: Path, epochs: int = 1, **changes) -> Path:
    """2 candidates, then 2 optimizers x 1 loss: 4 trials."""
    cfg = {
        "name": "t", "base_config": str(REPO / "configs" / "demo.yaml"), "root": str(folder / "sweeps"),
        "overrides": {**FAST, "data": {"num_workers": 0, "artifacts_dir": str(artifacts)}},
        "stage1": {"candidates": [{"network": "resnet10t"}, {"network": "ctnet10"}],
                   "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": epochs,
                                "image_size": 32}},
        "stage2": {"optimizers": ["rmsprop", "adam"], "losses": ["ce"]},
        "wandb": "disabled", "heartbeat_seconds": 2.0, **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def slurm(partition: str, workers: int = 2) -> dict:
    return {"kind": "slurm", "workers": workers, "partition": partition, "time": "00:15:00", "cpus_per_worker": 1}


def storage_of(url: str):
    return coord.make_storage(url)


def finished_points(url: str, name: str = "t") -> dict[str, Counter]:
    """Per stage: how many COMPLETE trials each grid point has (duplicates excluded)."""
    storage = storage_of(url)
    out = {}
    for k in (1, 2):
        study = optuna.load_study(study_name=f"{name}/stage{k}", storage=storage)
        out[f"stage{k}"] = Counter(tuple(sorted(coord.grid_params(t).items())) for t in study.get_trials()
                                   if t.state == TrialState.COMPLETE and t.user_attrs.get("duplicate_of") is None)
    return out


def winner(folder: Path) -> tuple:
    w = json.loads((folder / "sweeps" / "t" / "winner.json").read_text())
    return w["base_architecture"], w["optimizer"], w["loss"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, shared_artifacts):
    folder = tmp_path_factory.mktemp("local")
    proc = run_cli("sweep", "--config", str(write_sweep(folder, shared_artifacts)))
    assert proc.returncode == 0, proc.stdout[-3000:]
    return folder, finished_points(f"sqlite:///{folder / 'sweeps' / 't' / 'optuna.db'}")


def _storages():
    yield pytest.param("journal", id="journal")
    yield pytest.param("postgresql", id="postgresql")


@pytest.mark.parametrize("kind", _storages())
def test_slurm_sweep_gives_the_local_winner_with_each_point_trained_once(kind, partition, local_sweep, tmp_path,
                                                                          shared_artifacts):
    if kind == "journal":
        url = f"journal://{tmp_path / 'shared' / 't.log'}"
    else:
        url = os.environ.get("MEDSEL_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("MEDSEL_TEST_POSTGRES_URL is not set (.ci/run starts a local PostgreSQL and sets it)")
    changes = {"storage": url, "launcher": slurm(partition)}
    if kind == "postgresql":  # a fresh study name per run on the shared database
        changes["name"] = name = f"t{os.getpid()}{int(time.time())}"
    cfg = write_sweep(tmp_path, shared_artifacts, **changes)
    proc = run_cli("sweep", "--config", str(cfg), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    assert "submitted 2 workers as job array" in out and "job logs: " in out
    assert "[sweep] stage1 trial 0 " in out and "[sweep] stage2: 2/2 trials" in out and "stage 2 winner" in out
    local_folder, local_points = local_sweep
    points = finished_points(url, changes.get("name", "t"))
    assert points == local_points and all(set(c.values()) == {1} for c in points.values()), points
    if kind == "journal":  # (a PostgreSQL study has another name, so another sweep folder: compare the winner)
        assert winner(tmp_path) == winner(local_folder)
    else:
        w = json.loads((tmp_path / "sweeps" / name / "winner.json").read_text())
        assert (w["base_architecture"], w["optimizer"], w["loss"]) == winner(local_folder)
    record = json.loads((tmp_path / "sweeps" / changes.get("name", "t") / "launch.json").read_text())
    script = Path(record["sbatch_script"]).read_text()
    assert "#SBATCH --array=0-1" in script and "export HF_HUB_OFFLINE=1" in script


def _wait(predicate, limit_s: float = 300, what: str = ""):
    deadline = time.monotonic() + limit_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def test_a_cancelled_and_a_preempted_worker_mid_trial_and_the_sweep_still_completes(partition, tmp_path,
                                                                                      shared_artifacts):
    """Both workers mid-trial: one is cancelled (`scancel`), the other gets the signal SLURM sends before the time
    limit or on preemption (USR2) and requeues itself; the requeued worker continues both interrupted trials."""
    url = f"journal://{tmp_path / 'shared' / 't.log'}"
    cfg = write_sweep(tmp_path, shared_artifacts, epochs=5, storage=url, launcher=slurm(partition),  # both workers mid-trial at once
                      stage2={"optimizers": ["adam"], "losses": ["ce"]})
    proc = run_cli("sweep", "--config", str(cfg), "--detach", timeout=300)
    assert proc.returncode == 0 and "detached; follow with `python cli.py sweep" in proc.stdout, proc.stdout[-3000:]
    out = tmp_path / "sweeps" / "t"

    def training_trials():  # {array task: (trial number, run folder)} once both tasks train a trial
        study = optuna.load_study(study_name="t/stage1", storage=storage_of(url))
        found = {t.user_attrs["slurm_job"]: (t.number, t.user_attrs["run_dir"])
                 for t in study.get_trials(states=(TrialState.RUNNING,))
                 if t.user_attrs.get("slurm_job") and t.user_attrs.get("run_dir")}
        return found if len(found) == 2 else None

    running = _wait(training_trials, what="a trial in each SLURM worker")
    # Mid-trial: wait for the first epoch's checkpoint of one of them, so that its retry has one to continue.
    _wait(lambda: any((out / run_dir / "checkpoints" / "last.ckpt").exists() for _, run_dir in running.values()),
          what="a first epoch checkpoint")
    (cancel, (cancelled, _)), (preempt, (preempted, _)) = sorted(running.items())
    subprocess.run(["scancel", cancel], check=True)
    subprocess.run(["scancel", "--signal=USR2", preempt], check=True)  # submitit requeues the job on it
    follow = subprocess.run([sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(cfg), "--follow"], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert follow.returncode == 0, follow.stdout[-4000:]
    study = optuna.load_study(study_name="t/stage1", storage=storage_of(url))
    for number in (cancelled, preempted):
        old = study.get_trials()[number]
        assert old.state == TrialState.FAIL and coord.is_interrupted(old), old.user_attrs
    points = finished_points(url)
    assert len(points["stage1"]) == 2 and len(points["stage2"]) == 1
    assert all(set(c.values()) == {1} for c in points.values()), points
    retries = study.get_trials(states=(TrialState.COMPLETE,))
    assert {t.user_attrs.get("slurm_job") for t in retries} == {preempt}  # the requeued worker, under its own id
    # Each retry continues its interrupted attempt's run from its last epoch checkpoint (the `resume` work),
    # when that attempt had written one (the signal may come between the progress line and the checkpoint).
    continued = [t.user_attrs.get("continues") for t in retries]
    assert any(continued), [t.user_attrs for t in retries]
    assert (out / "winner.json").exists() and (out / "report.md").exists()


def test_two_process_ddp_trial_inside_one_slurm_worker(partition, tmp_path, shared_artifacts):
    """A `trainer.devices: 2` trial (gloo on CPU) in a 2-CPU worker: Lightning launches both ranks itself instead
    of waiting for a second srun task (the trial does not inherit the worker's srun variables)."""
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c", "-p", partition], capture_output=True, text=True).stdout.split()[0])
    if cpus < 2:
        pytest.skip(f"partition {partition} has {cpus} CPU per node; a 2-rank trial needs 2")
    url = f"journal://{tmp_path / 'shared' / 't.log'}"
    launcher = {**slurm(partition, workers=1), "cpus_per_worker": 2}
    cfg = write_sweep(tmp_path, shared_artifacts, storage=url, launcher=launcher,
                      overrides={**FAST, "data": {"num_workers": 0, "artifacts_dir": str(shared_artifacts)},
                                 "trainer": {"enable_model_summary": False, "accelerator": "cpu", "devices": 2,
                                             "strategy": "ddp", "limit_train_batches": 2, "limit_val_batches": 2}},
                      stage1={"candidates": [{"network": "ctnet10"}],
                              "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 16, "max_epochs": 1,
                                           "image_size": 32}},
                      stage2={"optimizers": ["adam"], "losses": ["ce"]})
    proc = run_cli("sweep", "--config", str(cfg), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    study = optuna.load_study(study_name="t/stage1", storage=storage_of(url))
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))
    log = (tmp_path / "sweeps" / "t" / trial.user_attrs["run_dir"] / "fit.log").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]


@pytest.mark.parametrize("change, message", [
    ({"launcher.partition": "no-such-gpu"}, "error: launcher.partition: 'no-such-gpu' is not a partition"),
    ({"PATH": "/usr/bin/nonexistent"}, "error: launcher slurm: 'sbatch' is not on PATH"),
])
def test_refused_settings_are_one_error_line_and_nothing_is_submitted(partition, tmp_path, shared_artifacts, change,
                                                                      message):
    cfg = write_sweep(tmp_path, shared_artifacts, storage=f"journal://{tmp_path / 't.log'}", launcher=slurm(partition))
    before = queued()
    args = [f"--launcher.partition={change['launcher.partition']}"] if "launcher.partition" in change else []
    env = {"PATH": change["PATH"]} if "PATH" in change else None
    proc = run_cli("sweep", "--config", str(cfg), *args, env=env, timeout=120)
    lines = proc.stdout.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and errors == lines[-1:] and errors[0].startswith(message), proc.stdout
    assert all(line.startswith("[sweep] ") for line in lines[:-1]), proc.stdout  # (the storage it would use)
    assert queued() <= before and not (tmp_path / "sweeps" / "t" / "launch.json").exists()
