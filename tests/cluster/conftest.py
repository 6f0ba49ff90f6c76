"""The SLURM partition the real-SLURM tests submit to (`.ci/start_slurm.sh` exports it); they skip without one."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture(scope="module")
def partition() -> str:
    name = os.environ.get("MEDSEL_TEST_SLURM_PARTITION")
    if not name:
        pytest.skip("no SLURM here: run `eval \"$(bash .ci/start_slurm.sh)\"` first (CI does)")
    return name


def queued() -> set[str]:
    """The ids of the jobs in the SLURM queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return set(out.split())


@pytest.fixture(autouse=True)
def cancel_what_a_test_leftqueued():
    """A real-SLURM test that fails mid-way leaves its jobs queued; they would change the queue that the next
    test reads. Cancel what the test added (only where the real SLURM runs)."""
    if not os.environ.get("MEDSEL_TEST_SLURM_PARTITION"):
        yield
        return
    before = queued()
    yield
    left = queued() - before
    if left:
        subprocess.run(["scancel", *sorted(left)], check=False)
