"""SLURM launch settings: checked before anything is submitted, one error naming the key."""

from __future__ import annotations

import pytest

from cluster.jobs import WorkerJob, resolve, submit_workers
from cluster.queue import job_states, summary
from cluster.slurm import SlurmSettings, time_minutes
from errors import ConfigError


@pytest.mark.parametrize("value, minutes", [
    ("30", 30), ("90:30", 91), ("04:00:00", 240), ("1-00", 1440), ("2-03:30", 3090), ("1-00:00:30", 1441), (45, 45),
])
def test_slurm_time_formats(value, minutes):
    assert time_minutes(value) == minutes


@pytest.mark.parametrize("value", ["4h", "", "1:2:3:4", "-5", 0, "00:00:00"])
def test_bad_time_names_the_key(value):
    with pytest.raises(ConfigError, match=r"launcher\.time"):
        time_minutes(value)


@pytest.mark.parametrize("values, key", [
    ({"workerz": 2}, "unknown key"),
    ({"workers": 0}, "launcher.workers"),
    ({"workers": True}, "launcher.workers"),
    ({"gpus_per_worker": -1}, "launcher.gpus_per_worker"),
    ({"mem_gb": 0}, "launcher.mem_gb"),
    ({"array_parallelism": 0}, "launcher.array_parallelism"),
    ({"time": "00:01:00", "signal_delay_s": 120}, "launcher.signal_delay_s"),
    ({"sbatch": ["--constraint=a100"]}, "launcher.sbatch"),
])
def test_bad_settings_are_one_error_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        SlurmSettings.from_dict(values)


def test_settings_reach_the_executor(tmp_path):
    settings = SlurmSettings.from_dict({
        "workers": 3, "partition": "gpu", "account": "lab", "qos": "low", "time": "1-00:00:00", "gpus_per_worker": 2,
        "cpus_per_worker": 8, "mem_gb": 32, "array_parallelism": 2, "setup": "module load cuda",
        "sbatch": {"constraint": "a100"}})
    assert settings.setup == ("module load cuda",)
    params = settings.executor(tmp_path, cluster="slurm")._executor.parameters
    assert params["partition"] == "gpu" and params["account"] == "lab" and params["qos"] == "low"
    assert params["time"] == 1440 and params["gpus_per_node"] == 2 and params["cpus_per_task"] == 8
    assert params["mem"] == "32GB" and params["array_parallelism"] == 2
    assert params["setup"] == ["module load cuda"] and params["additional_parameters"] == {"constraint": "a100"}
    assert params["signal_delay_s"] == 120


def test_missing_sbatch_is_one_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="'sbatch' is not on PATH"):
        SlurmSettings(partition="gpu").check_cluster()


def test_worker_job_runs_by_reference_and_requeues_a_bounded_number_of_times(tmp_path):
    job = WorkerJob("tests.cluster.targets:record", {"folder": str(tmp_path)}, max_requeues=2)
    assert job(4) == {"index": 4, "array_task": None, "requeues": 0}
    first = job.checkpoint(4)
    assert first is not None and job.requeues == 1 and first.args == (4,)
    assert job.checkpoint(4) is not None and job.checkpoint(4) is None  # the third signal ends the job
    with pytest.raises(ValueError, match="package.module:function"):
        resolve("record")


def test_workers_submitted_as_one_batch_run_each_index(tmp_path):
    executor = SlurmSettings(workers=2).executor(tmp_path / "logs", cluster="debug")
    jobs = submit_workers(executor, "tests.cluster.targets:record", 2, {"folder": str(tmp_path)})
    assert sorted(j.result()["index"] for j in jobs) == [0, 1]
    assert len(list(tmp_path.glob("start-*"))) == 2


def test_queue_without_squeue_reports_all_ended(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert job_states(["12_0", "12_1"]) == {}
    assert summary({"12_0": "RUNNING", "12_1": "PENDING"}, ["12_0", "12_1", "12_2"]) == "1 running, 1 pending, 1 ended"
