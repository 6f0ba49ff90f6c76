"""A worker job that SLURM may preempt or time out: submitit signals it, and it requeues itself.

The job runs a module-level function given by reference ("package.module:function"), so the submitted pickle
holds only names and plain arguments, and this module imports nothing of the sweep. What a requeued worker
continues is the function's business: the sweep's worker loop claims trials from the shared storage, and a
trial that was interrupted resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission


def resolve(target: str):
    """The function named by "package.module:function"."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"target '{target}' must be 'package.module:function'")
    return getattr(import_module(module), name)


class WorkerJob(Checkpointable):
    """Calls `target(index, **kwargs)`; on SLURM's pre-timeout or preemption signal it is requeued, up to
    `max_requeues` times (counted in the job's own pickled state, which submitit resubmits).

    Args:
        target: "package.module:function" run in the job.
        kwargs: plain (picklable) keyword arguments for it.
        max_requeues: requeues allowed after a signal; then the job ends and the storage's liveness check
            (the trial heartbeat) hands its trial to another worker.
    """

    def __init__(self, target: str, kwargs: dict[str, Any] | None = None, max_requeues: int = 10):
        self.target = target
        self.kwargs = dict(kwargs or {})
        self.max_requeues = max_requeues
        self.requeues = 0

    def __call__(self, index: int) -> Any:
        os.environ["MEDSEL_WORKER_REQUEUES"] = str(self.requeues)
        return resolve(self.target)(index, **self.kwargs)

    def checkpoint(self, index: int) -> DelayedSubmission | None:  # type: ignore[override]
        """Called by submitit in the job when SLURM signals it: requeue with the same arguments."""
        if self.requeues >= self.max_requeues:
            return None
        self.requeues += 1
        return DelayedSubmission(self, index)


def submit_workers(executor: submitit.Executor, target: str, workers: int,
                   kwargs: dict[str, Any] | None = None, max_requeues: int = 10) -> list[submitit.Job]:
    """Submit `workers` copies of `target` as one job array (indices 0..workers-1); returns their jobs."""
    job = WorkerJob(target, kwargs, max_requeues)
    with executor.batch():
        jobs = [executor.submit(job, i) for i in range(workers)]
    return jobs
