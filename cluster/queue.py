"""Job states from `squeue`, which every SLURM answers (`sacct` needs the accounting daemon many clusters,
and CI's single node, run without)."""

from __future__ import annotations

import shutil
import subprocess

# squeue's states for a job that has not finished (a finished job leaves the queue after MinJobAge).
WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "STOPPED"}


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job or array task id still known to the queue ("12_3" -> "RUNNING"); absent: finished.

    A pending array is listed by squeue as one line ("12_[0-3]"): its tasks are reported as PENDING.
    """
    if not job_ids or shutil.which("squeue") is None:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # squeue exits 1 when none of the ids is known any more
        return {}
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        states[job] = state
    return {j: states[j] for j in job_ids if j in states}


def summary(states: dict[str, str], job_ids: list[str]) -> str:
    """One line such as '2 running, 1 pending, 1 finished' for the follower's display."""
    running = sum(s in RUNNING for s in states.values())
    waiting = sum(s in WAITING for s in states.values())
    done = len(job_ids) - len(states)
    parts = [f"{running} running"] + ([f"{waiting} pending"] if waiting else []) + ([f"{done} ended"] if done else [])
    return ", ".join(parts)
