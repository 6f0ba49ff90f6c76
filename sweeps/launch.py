"""Launching a sweep on SLURM and following it: checks, submission, and the progress display read from storage.

`python cli.py sweep --config X --launcher slurm` runs here, on a login node (no GPU; this process never imports
torch: the preflight and the weights check run in forked children). Everything is checked before anything is
submitted: the SLURM settings (`cluster.slurm`), the storage (PostgreSQL or a journal file on shared storage;
SQLite cannot be shared by nodes), the trials' devices against `gpus_per_worker`, every trial config (the
sweep's preflight) and every candidate's pretrained weights (compute nodes run with the hub offline). Then
submitit submits `launcher.workers` workers as one job array (`sweeps.cluster_jobs.work_stages`) and the final
job (`finish`, after all of them), and the job ids go to `<sweep>/launch.json`.

The follower shows the same display as a local sweep (`sweeps.progress.StageProgress`): trials are read from the
storage, their epochs from each trial's `progress.jsonl` on the shared filesystem, job states from `squeue`
(no `sacct`: clusters often run without its accounting daemon). `--detach` returns after submission, `--follow`
attaches again; Ctrl-C stops the follower only and prints the `scancel` command that would stop the jobs.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import threading
import time
from pathlib import Path
from typing import Any

from errors import ConfigError
from sweeps import coordinator as coord
from sweeps import grid, jobs, trials
from sweeps.config import SweepConfig
from sweeps.log import log

REPO = Path(__file__).resolve().parents[1]
RECORD = "launch.json"  # in the sweep folder: the job ids and logs folder of the last launch
POLL_SECONDS = 2.0


def check_storage(sweep: SweepConfig) -> None:
    """Workers on several nodes need one storage they can all reach and lock: not SQLite."""
    url = sweep.storage_url
    if url.startswith("sqlite"):
        raise ConfigError(f"storage: '{url}' is SQLite, which workers on several nodes cannot share (its locks do "
                          "not hold over NFS). Give --storage journal:///shared/path/<name>.log (a file on shared "
                          "storage, no server) or --storage postgresql://user:pass@host/db.")
    if not (url.startswith(coord.JOURNAL) or url.startswith("postgresql") or url.startswith("mysql")):
        raise ConfigError(f"storage: '{url}' is not a storage a SLURM launch can use; give journal:///shared/path/"
                          "<name>.log or postgresql://user:pass@host/db.")


def check_trials_fit(sweep: SweepConfig, gpus_per_worker: int) -> None:
    """Every trial runs inside one worker: on one node, on at most the worker's GPUs."""
    configs = trials.TrialConfigs(sweep)
    for name in configs.candidates:
        trainer = configs.candidate(name).get("trainer") or {}
        if int(trainer.get("num_nodes") or 1) > 1:
            raise ConfigError(f"trainer.num_nodes: {trainer['num_nodes']} (candidate {name}); a sweep trial runs "
                              "inside one SLURM worker on one node. Use num_nodes: 1 and trainer.devices up to "
                              "launcher.gpus_per_worker.")
        wanted = jobs.devices({"trainer": trainer})
        if gpus_per_worker and wanted > gpus_per_worker:
            raise ConfigError(f"launcher.gpus_per_worker: {gpus_per_worker}, but candidate {name} trains on {wanted} "
                              "devices (trainer.devices); raise launcher.gpus_per_worker or lower trainer.devices.")


def _job_sweep(sweep: SweepConfig) -> dict[str, Any]:
    """The sweep as the jobs get it: absolute paths (a job's working directory is the submission's, but be
    safe), the storage URL fixed, one worker process per array task."""
    values = sweep.to_dict()
    values.update(root=str(Path(sweep.root).resolve()), base_config=str(Path(sweep.base_config).resolve()),
                  storage=sweep.storage_url, workers=1)
    if values["storage"].startswith(coord.JOURNAL):
        values["storage"] = coord.JOURNAL + coord.journal_path(values["storage"])
    return values


def _executor(settings, folder: Path, name: str, cluster: str | None):
    setup = (f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}", "export HF_HUB_OFFLINE=1", *settings.setup)
    return dataclasses.replace(settings, setup=setup).executor(folder, cluster=cluster, name=name)


def submit(sweep: SweepConfig, settings, cluster: str | None = "slurm") -> dict[str, Any]:
    """Submit the worker array and the final job; returns (and writes) the launch record."""
    from cluster.jobs import WorkerJob, submit_workers

    logs = sweep.out_dir.resolve() / "slurm"
    payload = {"sweep": _job_sweep(sweep)}
    submitted = time.time()
    array = submit_workers(_executor(settings, logs, f"medsel-{sweep.name}", cluster),
                           "sweeps.cluster_jobs:work_stages", settings.workers, payload)
    array_id = array[0].job_id.split("_")[0]
    final_settings = dataclasses.replace(settings, workers=1, array_parallelism=None,
                                         sbatch={**settings.sbatch, "dependency": f"afterany:{array_id}"})
    final = _executor(final_settings, logs, f"medsel-{sweep.name}-final", cluster).submit(
        WorkerJob("sweeps.cluster_jobs:finish", payload), 0)
    record = {"array": array_id, "tasks": [j.job_id for j in array], "final": final.job_id, "logs": str(logs),
              "final_result": str(final.paths.result_pickle), "final_log": str(final.paths.stdout),
              "sbatch_script": str(array[0].paths.submission_file), "submitted_at": submitted,
              "workers": settings.workers}
    (sweep.out_dir / RECORD).write_text(json.dumps(record, indent=1))
    return record


def prepare(sweep: SweepConfig) -> Any:
    """Every check of a SLURM launch, in order of cost; the checked settings. Submits nothing."""
    settings = sweep.launcher.slurm()
    check_storage(sweep)
    if sweep.workers != 1:
        raise ConfigError("workers: with --launcher slurm each array task runs one worker; set launcher.workers "
                          f"(now {sweep.launcher.workers}) instead of workers ({sweep.workers}).")
    sweep.validate()
    check_trials_fit(sweep, settings.gpus_per_worker)
    settings.check_cluster()
    _refuse_second_launch(sweep)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    jobs.check_in_child(sweep)  # every trial config through the fit parser
    jobs.weights_in_child(sweep)  # compute nodes run with the hub offline
    _enqueue_stage1(sweep)  # also proves the storage reachable; workers starting together then enqueue nothing
    return settings


def _enqueue_stage1(sweep: SweepConfig) -> None:
    from sweeps import worker

    configs = trials.TrialConfigs(sweep)
    stage = grid.stage1(sweep, list(configs.candidates), configs.shared)
    try:
        ss = worker._open(sweep, stage)
    except Exception as e:  # noqa: BLE001 -- any driver's error: one line naming the storage
        raise ConfigError(f"storage: cannot open '{sweep.storage_url}' from here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); the login node and the workers must all "
                          "reach it.") from None
    worker._check_folds(ss, sweep)
    added = coord.ensure_grid(ss, sweep.retry_failed)
    log.info(f"[sweep] {stage.name}: {len(stage.grid)} grid points, {added} newly enqueued")


def _refuse_second_launch(sweep: SweepConfig) -> None:
    from cluster.queue import job_states

    record = read_record(sweep, required=False)
    if record and job_states([*record["tasks"], record["final"]]):
        raise ConfigError(f"sweep '{sweep.name}' already has jobs in the queue (array {record['array']}, final "
                          f"{record['final']}); follow them with --follow, or `scancel {record['array']} "
                          f"{record['final']}` first.")


def read_record(sweep: SweepConfig, required: bool = True) -> dict[str, Any] | None:
    path = sweep.out_dir / RECORD
    if not path.exists():
        if required:
            raise ConfigError(f"--follow: {path} does not exist; this sweep was never launched with --launcher slurm "
                              "from here (launch it first).")
        return None
    return json.loads(path.read_text())


def main(sweep: SweepConfig, detach: bool, follow_only: bool, command: str) -> int:
    """`cli.py sweep --launcher slurm [--detach]` or `--follow`: the exit code."""
    from runs import interrupts

    if follow_only:
        record = read_record(sweep)
    else:
        log.info(f"[sweep] {sweep.name}: storage {sweep.storage_url}")
        settings = prepare(sweep)
        record = submit(sweep, settings)
        log.info(f"[sweep] submitted {record['workers']} workers as job array {record['array']} "
                 f"(tasks {', '.join(record['tasks'])}) and the final test as job {record['final']} (after them)")
        log.info(f"[sweep] job logs: {record['logs']}")
    follow_cmd = f"{command} --follow"
    stop = f"scancel {record['array']} {record['final']}"
    if detach:
        log.info(f"[sweep] detached; follow with `{follow_cmd}`, cancel with `{stop}`")
        return 0
    try:
        return Follower(sweep, record).run()
    except interrupts.Interrupted as e:
        log.warning(f"interrupted: the follower stopped; the jobs keep running. Follow again with `{follow_cmd}`; "
                    f"cancel them with `{stop}`")
        return e.exit_code


class Follower:
    """The local sweep's display, fed from the storage and the trials' progress files."""

    def __init__(self, sweep: SweepConfig, record: dict[str, Any], out=None):
        self.sweep, self.record, self.out = sweep, record, out or sys.stdout
        self.jobs = [*record["tasks"], record["final"]]
        self.queue_line = ""
        self.first_epoch_at: float | None = None  # when the first trial's first epoch was seen (benchmarks)

    def jobs_left(self) -> dict[str, str]:
        from cluster.queue import job_states, summary

        states = job_states(self.jobs)
        line = f"[sweep] jobs: {summary(states, self.jobs)}"
        if line != self.queue_line:
            self.queue_line = line
            log.info(line)
        return states

    def run(self) -> int:
        configs = trials.TrialConfigs(self.sweep)
        stages = [grid.stage1(self.sweep, list(configs.candidates), configs.shared), grid.stage2(self.sweep, configs.shared)]
        for stage in stages:
            if not self.follow_stage(stage):
                break
        return self.final()

    def _open(self, stage: grid.Stage) -> coord.StageStudy | None:
        """The stage's study once a worker (or the final job) has created it; None when no job is left."""
        storage = coord.make_storage(self.sweep.storage_url)
        while True:
            try:
                storage.get_study_id_from_name(stage.study_name)
                return coord.open_study(storage, stage, coord.make_pruner("none"), self.sweep.seed)
            except KeyError:
                if not self.jobs_left():
                    return None
                time.sleep(POLL_SECONDS)

    def follow_stage(self, stage: grid.Stage) -> bool:
        """Show the stage until every grid point has ended; False when the jobs ended before that."""
        from sweeps.worker import points_done

        ss = self._open(stage)
        if ss is None:
            return False
        progress = _stage_progress(stage, points_done(ss), self.record["workers"])
        watched = StageWatch(self, ss, progress)
        try:
            while True:
                watched.poll()
                points = coord.grid_status(ss)
                if all(p.state not in ("live", "missing") for p in points) and not watched.open:
                    return all(p.state == "finished" for p in points) or self.sweep.allow_failures
                if not self.jobs_left():
                    return False
                time.sleep(POLL_SECONDS)
        finally:
            watched.close()
            progress.close()

    def final(self) -> int:
        """Wait for the final job; print its winner lines; its exit code."""
        log.info(f"[sweep] final job {self.record['final']}: tests the winner on a compute node "
                 f"(log: {self.record['final_log']})")
        while self.record["final"] in self.jobs_left():
            time.sleep(POLL_SECONDS)
        result = Path(self.record["final_result"])
        if not result.exists():
            raise ConfigError(f"the final job {self.record['final']} ended without a result (cancelled, or out of "
                              f"time); see {self.record['final_log']}, then rerun with --launcher slurm to finish.")
        with open(result, "rb") as fh:
            status, value = pickle.load(fh)  # submitit's own result file: ("success", result) or ("error", trace)
        log_file = Path(self.record["final_log"])
        lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        start = next((i for i, line in enumerate(lines) if "stage 2 winner" in line), len(lines))
        for line in lines[start:]:
            if line.startswith("[sweep]") or line.startswith("[report]"):
                log.info(line)
        if status != "success":
            last = [line for line in str(value).strip().splitlines() if line.strip()][-1:]
            raise ConfigError(f"the final job failed: {last[0] if last else value} (log: {log_file})")
        return int(value or 0)


def _stage_progress(stage: grid.Stage, done: int, workers: int):
    from sweeps.progress import StageProgress

    return StageProgress(stage.name, len(stage.grid), done, workers, tty=sys.stdout.isatty())


class StageWatch:
    """The running trials of one stage as the storage shows them: announced when they start, their epochs
    followed from their progress files, their ends reported as the worker reports them."""

    def __init__(self, follower: Follower, ss: coord.StageStudy, progress):
        self.follower, self.ss, self.progress = follower, ss, progress
        self.open: dict[int, Any] = {}  # trial number -> its progress-file follower
        self.ended: set[int] = set()
        self.lock = threading.Lock()

    def poll(self) -> None:
        from optuna.trial import TrialState

        for t in self.ss.study.get_trials(deepcopy=False):
            run_dir = t.user_attrs.get("run_dir")
            if run_dir is None or t.number in self.ended or t.user_attrs.get("duplicate_of") is not None:
                continue
            if t.state == TrialState.RUNNING and t.number not in self.open:
                self._start(t, run_dir)
            elif t.state.is_finished():
                self._end(t)

    def _label(self, t) -> str:
        return f"trial {t.number} {self.ss.stage.run_label(coord.grid_params(t))}"

    def _start(self, t, run_dir: str) -> None:
        from runs.files import PROGRESS, RunFiles
        from sweeps.progress import follow

        label, path = self._label(t), self.follower.sweep.out_dir / run_dir
        log.info(f"[sweep] {self.ss.stage.name} {label} -> {path} (log: fit.log)")
        self.progress.trial_started(label)

        def on_epoch(record: dict[str, Any]) -> None:
            with self.lock:
                if self.follower.first_epoch_at is None:
                    self.follower.first_epoch_at = time.time()
                self.progress.current = label
                self.progress.epoch_done(record)

        self.open[t.number] = follow(RunFiles(path) / PROGRESS, on_epoch).__enter__()

    def _end(self, t) -> None:
        from optuna.trial import TrialState

        from sweeps import selection
        from sweeps.worker import points_done

        watcher = self.open.pop(t.number, None)
        if watcher is not None:
            watcher.__exit__(None, None, None)
        self.ended.add(t.number)
        name, seconds = f"[sweep] {self.ss.stage.name} trial {t.number}", float(t.user_attrs.get("seconds", 0))
        reason = t.user_attrs.get("fail_reason", "")
        if t.state == TrialState.COMPLETE:
            log.info(f"{name} done in {seconds:.0f}s: {self.ss.stage.objective}={t.value:.4f}")
        elif t.state == TrialState.PRUNED:
            log.info(f"{name} pruned after {t.user_attrs.get('epochs_run', '?')} epochs")
        elif coord.is_interrupted(t):
            log.warning(f"{name} INTERRUPTED: {reason}; a worker trains it again")
        else:
            log.warning(f"{name} FAILED ({seconds:.0f}s): {reason}")
        with self.lock:
            self.progress.trial_finished(seconds, points_done(self.ss), selection.leader(self.follower.sweep, self.ss))

    def close(self) -> None:
        for watcher in self.open.values():
            watcher.__exit__(None, None, None)
        self.open.clear()
