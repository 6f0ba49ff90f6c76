"""The functions a SLURM launch runs on compute nodes: a worker of the job array, and the final job.

Submitted by reference (`cluster.jobs.WorkerJob`, "sweeps.cluster_jobs:work_stages"), so the submitted pickle
holds only the sweep's plain dict. A worker does what a sweep command on one more machine does against the
shared storage (PostgreSQL or a journal file): claim stage-1 grid points until none is waiting or running,
compute the same stage-1 winner as every other worker, then work on stage 2; trials that a stopped worker left
interrupted are enqueued again at once (`coord.work(retry=True)`), since that worker may never come back. The
final job runs after every worker has ended (an `afterany` dependency): the sweep's usual run, which finds
both stages finished (or trains what the workers left), tests the winner once and writes the outputs.
"""

from __future__ import annotations

import os
from typing import Any

from sweeps import coordinator as coord
from sweeps import grid, jobs, selection, trials, worker
from sweeps.config import SweepConfig
from sweeps.grid import Stage
from sweeps.log import log


def _in_job(sweep_dict: dict[str, Any]) -> SweepConfig:
    os.environ["HF_HUB_OFFLINE"] = "1"  # compute nodes often have no internet: weights come from the shared cache
    jobs.start_forkserver()
    return SweepConfig.from_dict(sweep_dict)  # its `launcher` is only read by `cli.py sweep`, not by a job


def _work_on(sweep: SweepConfig, stage: Stage, base: str | None, configs: trials.TrialConfigs) -> coord.StageStudy:
    # Several workers at once: duplicates train once (coord), every rung's promotion is recorded once (schedule).
    return worker.run_stage(sweep, stage, base, configs, retry=True)


def work_stages(index: int, sweep: dict[str, Any]) -> int:
    """Array task `index`: train grid points of both stages until none is left; 0, or 1 when stage 1 ended
    incomplete (no stage-2 base can be chosen; the final job reports the missing points)."""
    config = _in_job(sweep)
    log.info(f"[sweep] {config.name}: SLURM worker {index} (job {os.environ.get('SLURM_JOB_ID', '?')}, "
             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}), storage {config.storage_url}")
    configs = trials.TrialConfigs(config)
    ss1 = _work_on(config, grid.stage1(config, list(configs.candidates), configs.shared), None, configs)
    if any(p.state != "finished" for p in coord.grid_status(ss1)) and not config.allow_failures:
        return 1
    base = selection.stage_result(config, ss1).best["candidate"]
    log.info(f"[sweep] stage 1 winner: {base}")
    _work_on(config, grid.stage2(config, configs.shared), base, configs)
    return 0


def finish(index: int, sweep: dict[str, Any]) -> int:
    """The final job: the sweep's own run (preflight done before submission), which tests the winner once and
    writes the leaderboards, report and winner files; its exit code."""
    from sweeps.sweep import exit_code, run

    config = _in_job(sweep)
    return exit_code(config, run(config, preflight=lambda _: None))
