"""The SLURM partition the real-SLURM tests submit to (`.ci/start_slurm.sh` exports it); they skip without one."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def partition() -> str:
    name = os.environ.get("MEDSEL_TEST_SLURM_PARTITION")
    if not name:
        pytest.skip("no SLURM here: run `eval \"$(bash .ci/start_slurm.sh)\"` first (CI does)")
    return name
