"""Worker functions the cluster tests submit by reference (importable from the repo root in the job)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def record(index: int, folder: str) -> dict:
    """Write which array task and requeue this is; return what the job saw."""
    seen = {"index": index, "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "requeues": int(os.environ.get("MEDSEL_WORKER_REQUEUES", "0"))}
    Path(folder, f"start-{index}-{seen['requeues']}-{time.time_ns()}").touch()
    return seen


def wait_for_release(index: int, folder: str, limit_s: float = 120) -> dict:
    """Record a start, then wait until the test writes `release` (so it can signal or requeue the job)."""
    seen = record(index, folder)
    deadline = time.monotonic() + limit_s
    while not Path(folder, "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.2)
    return seen
