"""Against a real single-node SLURM (`.ci/start_slurm.sh` exports MEDSEL_TEST_SLURM_PARTITION): submission,
fail-fast checks, and a worker that SLURM signals before its time limit requeueing itself."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from cluster.jobs import submit_workers
from cluster.queue import job_states
from cluster.slurm import SlurmSettings
from errors import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the job imports its target from the submitting directory


def _wait(predicate, limit_s: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_workers_run_as_one_array_with_the_settings(partition, in_repo, tmp_path):
    settings = SlurmSettings.from_dict({"workers": 2, "partition": partition, "time": "00:10:00",
                                        "cpus_per_worker": 1, "setup": ["export MEDSEL_SETUP_LINE=1"]})
    settings.check_cluster()
    jobs = submit_workers(settings.executor(tmp_path / "logs"), "tests.cluster.targets:record", settings.workers,
                          {"folder": str(tmp_path)})
    assert {j.job_id.split("_")[0] for j in jobs} == {jobs[0].job_id.split("_")[0]}  # one array
    seen = sorted((j.result() for j in jobs), key=lambda s: s["index"])
    assert [s["index"] for s in seen] == [0, 1]
    assert [s["array_task"] for s in seen] == ["0", "1"]
    script = Path(jobs[0].paths.submission_file).read_text()
    assert f"#SBATCH --partition={partition}" in script and "#SBATCH --signal=USR2@120" in script
    assert "export MEDSEL_SETUP_LINE=1" in script and "#SBATCH --time=10" in script


def test_unknown_partition_submits_nothing(partition):
    def queued() -> set[str]:
        return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())

    before = queued()
    with pytest.raises(ConfigError, match="'no-such-gpu' is not a partition of this cluster; available: .*" + partition):
        SlurmSettings(partition="no-such-gpu").check_cluster()
    assert queued() <= before  # earlier tests' jobs may leave the queue meanwhile; none may join it


def test_signalled_worker_requeues_itself_and_runs_again(partition, in_repo, tmp_path):
    settings = SlurmSettings(workers=1, partition=partition, time="00:10:00", cpus_per_worker=1)
    (job,) = submit_workers(settings.executor(tmp_path / "logs"), "tests.cluster.targets:wait_for_release", 1,
                            {"folder": str(tmp_path)})
    _wait(lambda: list(tmp_path.glob("start-0-0-*")), what="the first start")
    # What SLURM sends `signal_delay_s` before the time limit (and on preemption with a grace time).
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    _wait(lambda: list(tmp_path.glob("start-0-1-*")), what="the requeued start")
    (tmp_path / "release").touch()
    assert job.result()["requeues"] == 1
    _wait(lambda: job_states([job.job_id]).get(job.job_id) in (None, "COMPLETING", "COMPLETED"), what="the end")
