"""Working on a stage: enqueue its grid, run its trials (in this process or in `workers` processes, each
claiming grid points from the storage) and record how each trial ended."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from errors import ConfigError
from runs import files, interrupts
from runs.files import PROGRESS, RunFiles
from runs.interrupts import Interrupted
from sweeps import budget, fold_stopping, grid, isolation, jobs, resume, reuse, schedule, selection, trials
from sweeps import coordinator as coord
from sweeps.config import SweepConfig, merge
from sweeps.grid import Stage
from sweeps.log import log
from sweeps.progress import StageProgress, follow

Execute = Callable[[dict[str, Any], Path], isolation.Outcome]


def trial_config(configs: trials.TrialConfigs, stage: Stage, params: dict[str, Any], base: str | None
                 ) -> tuple[dict, list[str]]:
    """The fit config of one grid point and its W&B tags (`base`: the stage-1 winner, for stage 2)."""
    if stage.chooses_architecture:
        name = params["candidate"]
        cfg = configs.candidate(name)
    else:
        name = base
        cfg = configs.stage2(name, params["optimizer"], params["loss"])
    opt = cfg["model"]["optimizer"]
    opt_name = opt.get("class_path", "").rsplit(".", 1)[-1] if isinstance(opt, dict) else str(opt)
    tags = [f"arch:{name}", f"optimizer:{opt_name}", f"loss:{cfg['model'].get('loss', 'ce')}", f"repeat:{params['repeat']}"]
    if params.get("fold") is not None:
        tags.append(f"fold:{params['fold']}")
    return cfg, tags


def points_done(ss: coord.StageStudy) -> int:
    """Grid points that reached an end (finished, failed or interrupted) and are not queued again."""
    return sum(p.state not in ("live", "missing") for p in coord.grid_status(ss))


class TrialRunner:
    """Runs one claimed trial in an isolated process and records its outcome on the Optuna trial.

    Args:
        sweep: the sweep config.
        stage: the stage the trial belongs to.
        base: the stage-1 winner (stage 2).
        configs: the sweep's trial configs.
        progress: the stage's progress display.
        execute: trains a config in a run directory and says how it ended (`jobs.execute`).
    """

    def __init__(self, sweep: SweepConfig, stage: Stage, base: str | None, configs: trials.TrialConfigs,
                 progress: StageProgress, execute: Execute | None = None):
        self.sweep, self.stage, self.base, self.configs = sweep, stage, base, configs
        self.progress, self.execute = progress, execute or jobs.execute
        self._estimated: set[str] = set()  # grid points whose cost was estimated after their first epoch
        self._trained: dict[int, int] = {}  # trial number -> the epochs it trains (a promoted rung: its share)
        self._in_place: set[int] = set()  # trials that continue their previous rung's run in its folder

    def _prepare(self, ss: coord.StageStudy, number: int, params: dict[str, Any]) -> tuple[dict, Path]:
        relative = Path("trials") / self.stage.name / f"{number:03d}-{grid.slug(self.stage.run_label(params))}"
        run_dir = self.sweep.out_dir / relative
        if run_dir.exists():  # a retried trial number never reuses a directory, but be safe on manual edits
            shutil.rmtree(run_dir)
        cfg, tags = trial_config(self.configs, self.stage, params, self.base)
        cfg = merge(cfg, schedule.rung_overrides(self.stage, params, _max_epochs(cfg)))  # successive halving
        if params.get("fold") is not None:
            cfg = merge(cfg, grid.fold_overrides(self.sweep, params["fold"]))
        seed = self.sweep.seed + params["repeat"]
        fit_config = resume.fingerprint(cfg, seed)
        ss.set_attr(number, resume.FINGERPRINT, fit_config)
        previous = resume.previous_attempt(ss, self.sweep.out_dir, params, fit_config)
        if previous is not None:  # an interrupted attempt of this grid point: continue its run from its last epoch
            resume.take_over(self.sweep.out_dir, previous, run_dir)
            ss.set_attr(number, resume.CONTINUES, previous.run_dir)
            log.info(f"[sweep] {self.stage.name} trial {number} continues trial {previous.number}'s run "
                     f"({previous.run_dir}) from its last epoch checkpoint")
        continued = self._continue_rung(ss, number, params, cfg) if previous is None else None
        if continued is not None:  # successive halving: in the previous rung's folder (`sweeps.schedule`)
            relative, run_dir = Path(continued), self.sweep.out_dir / continued
        pruning = None
        if self.sweep.pruner != "none":
            pruning = {"storage": self.sweep.storage_url, "study_name": self.stage.study_name,
                       "trial_id": ss.trial_id(number), "monitor": self.stage.objective, "pruner": self.sweep.pruner,
                       "fold": params.get("fold"), "direction": self.stage.direction}
        cfg = trials.finalize(cfg, self.sweep, run_dir, self.stage.name, seed, tags, pruning)
        if previous is not None or continued is not None:
            cfg["ckpt_path"] = str(RunFiles(run_dir).last_checkpoint)  # `cli.py fit`'s key; `jobs.execute` passes it on
        ss.set_attr(number, "run_dir", relative.as_posix())  # relative to the sweep folder
        ss.set_attr(number, "sweep_dir", str(self.sweep.out_dir.resolve()))  # for workers with other folders
        return cfg, run_dir

    def __call__(self, ss: coord.StageStudy, frozen: FrozenTrial) -> None:
        number, params = frozen.number, coord.grid_params(frozen)
        trial = optuna.trial.Trial(ss.study, ss.trial_id(number))
        for name, values in self.stage.search_space().items():  # records the fixed grid point as its params
            trial.suggest_categorical(name, values)
        label = f"trial {number} {self.stage.run_label(params)}"
        if self._skipped(ss, number, params, label):
            return
        cfg, run_dir = self._prepare(ss, number, params)
        if self._reused(ss, number, cfg, label) or self._over_budget(ss, number, cfg, label):
            return
        if number in self._in_place:  # a promoted rung continues in its previous rung's folder
            schedule.start_from(run_dir)
        log.info(f"[sweep] {self.stage.name} {label} -> {run_dir} (log: fit.log)")
        self.progress.trial_started(label)
        started = time.perf_counter()
        try:
            with coord.Heartbeat(ss, number, self.sweep.heartbeat_seconds), \
                    follow(RunFiles(run_dir) / PROGRESS, self._on_epoch(ss, params, cfg, started)):
                outcome = self.execute(cfg, run_dir)
        except Interrupted as e:  # its process is stopped; its files (last-epoch checkpoint) stay for the rerun
            coord.fail(ss, number, f"{coord.INTERRUPTED}: {STOPPED_BY}{e.name}")
            raise
        seconds = time.perf_counter() - started
        self._record(ss, number, run_dir, cfg, outcome, seconds)
        self.progress.trial_finished(seconds, points_done(ss), selection.leader(self.sweep, ss))

    def _continue_rung(self, ss: coord.StageStudy, number: int, params: dict[str, Any], cfg: dict) -> str | None:
        """A promoted rung run: the previous rung's run folder to continue in (relative to the sweep folder),
        or None (not a promoted run, or its checkpoint is not here: it trains from epoch 0). Records the
        epochs it trains."""
        done = schedule.rung_epochs(self.stage, params, _max_epochs(cfg))
        if done is None:
            return None
        before = schedule.previous_rung(ss, self.sweep.out_dir, params)
        start = self.stage.rungs[int(params["rung"]) - 1] if before is not None else 0
        ss.set_attr(number, "trained_epochs", done - start)
        self._trained[number] = done - start
        if before is None:
            if params["rung"]:
                log.info(f"[sweep] {self.stage.name} trial {number}: the previous rung's checkpoint is not here; "
                         f"training {done} epochs from epoch 0")
            return None
        self._in_place.add(number)  # its folder is prepared once the trial is sure to train (`__call__`)
        log.info(f"[sweep] {self.stage.name} trial {number} continues {before} from epoch {start} to {done}")
        return before

    def _on_epoch(self, ss: coord.StageStudy, params: dict[str, Any], cfg: dict, started: float):
        """The progress display's epoch callback; after a grid point's first epoch, its cost and the stage's ETA."""
        point = self.stage.label(params)

        def on_epoch(record: dict[str, Any]) -> None:
            self.progress.epoch_done(record)
            if point in self._estimated:
                return
            self._estimated.add(point)
            left = sum(p.state in ("live", "missing") for p in coord.grid_status(ss))
            runs = max(1, self.sweep.cv.k) * self.sweep.repeats
            epochs = int(record.get("max_epochs") or (cfg.get("trainer") or {}).get("max_epochs") or 1)
            log.info(budget.first_epoch_line(self.stage.name, point, time.perf_counter() - started, epochs, runs, left,
                                             self.sweep.workers))
        return on_epoch

    def _skipped(self, ss: coord.StageStudy, number: int, params: dict[str, Any], label: str) -> bool:
        """Finish the trial untrained when its point has stopped early across folds (`sweeps.fold_stopping`)."""
        reason = fold_stopping.verdict(self.sweep, ss, params)
        if reason is None:
            return False
        fold_stopping.stop(ss, number, reason)
        log.info(f"[sweep] {self.stage.name} {label}: not trained, {self.stage.label(params)} {reason}")
        self.progress.trial_finished(0.0, points_done(ss), selection.leader(self.sweep, ss))
        return True

    def _over_budget(self, ss: coord.StageStudy, number: int, cfg: dict, label: str) -> bool:
        """Finish the trial untrained when what is left of the budget cannot cover it (`sweeps.budget`)."""
        trained = self._trained.get(number) or _max_epochs(cfg)  # the epochs this run trains: a rung's share, else all
        reason = budget.over_budget(self.sweep, ss.storage, trained)
        if reason is None:
            return False
        budget.limit(ss, number, reason)
        log.warning(f"[sweep] {self.stage.name} {label}: not trained, {reason}")
        self.progress.trial_finished(0.0, points_done(ss), selection.leader(self.sweep, ss))
        return True

    def _reused(self, ss: coord.StageStudy, number: int, cfg: dict, label: str) -> bool:
        """Record the config's fingerprint; finish the trial from an identical finished one if there is one."""
        sha = reuse.fingerprint(cfg)
        ss.set_attr(number, reuse.CONFIG_SHA, sha)
        found = reuse.find(ss, self.sweep.name, sha, number)
        if found is None:
            return False
        origin = reuse.adopt(ss, number, *found)
        log.info(f"[sweep] {self.stage.name} {label}: reused from {origin} (identical config: same seed and fold), not trained")
        self.progress.trial_finished(0.0, points_done(ss), selection.leader(self.sweep, ss))
        return True

    def _record(self, ss: coord.StageStudy, number: int, run_dir: Path, cfg: dict, outcome: isolation.Outcome,
                seconds: float) -> None:
        name = f"[sweep] {self.stage.name} trial {number}"
        ss.set_attr(number, "seconds", round(seconds, 2))
        timing = RunFiles(run_dir).read_json(files.TIMING)
        if timing:  # train+validation loop time; the rest of `seconds` is the trial's fixed cost
            ss.set_attr(number, "train_seconds", round(timing["train_seconds"], 2))
        if outcome.status == "interrupted":
            coord.fail(ss, number, f"{coord.INTERRUPTED}: {outcome.reason}")
            log.warning(f"{name} INTERRUPTED ({seconds:.0f}s): {outcome.reason}; it is retried when the sweep is rerun")
            return
        if outcome.status != "ok":
            coord.fail(ss, number, outcome.reason)
            log.warning(f"{name} FAILED ({seconds:.0f}s): {outcome.reason}")
            return
        run = cfg.get("run", {})
        try:
            summary = trials.summarize(run_dir, self.sweep.selection.epoch, run.get("monitor", "val/loss"), run.get("mode", "min"))
        except RuntimeError as e:
            coord.fail(ss, number, str(e))
            return
        for key in ("metrics", "params", "epoch", "epochs_run"):
            ss.set_attr(number, key, summary[key])
        if RunFiles(run_dir).pruned.exists():
            ss.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            log.info(f"{name} pruned after {summary['epochs_run']} epochs")
            return
        value = summary["metrics"].get(self.stage.objective)
        if value is None:
            coord.fail(ss, number, f"objective '{self.stage.objective}' was not logged")
            return
        ss.study.tell(number, value, skip_if_finished=True)
        log.info(f"{name} done in {seconds:.0f}s: {self.stage.objective}={value:.4f}")


def _max_epochs(cfg: dict[str, Any]) -> int:
    return int((cfg.get("trainer") or {}).get("max_epochs") or 1)


def _open(sweep: SweepConfig, stage: Stage) -> coord.StageStudy:
    storage = coord.make_storage(sweep.storage_url, heartbeat_seconds=sweep.heartbeat_seconds)
    ss = coord.open_study(storage, stage, coord.make_pruner(sweep.pruner), sweep.seed)
    ss.grace_seconds = GRACE_INTERVALS * sweep.heartbeat_seconds
    return ss


GRACE_INTERVALS = 6  # heartbeats a trial may miss before another machine retries it (make_storage's default)


def work(sweep: SweepConfig, stage: Stage, base: str | None, configs: trials.TrialConfigs,
         execute: Execute | None = None, ss: coord.StageStudy | None = None, retry: bool = False) -> None:
    """One worker: claim and train the stage's grid points until none is left (`retry`: see `coord.work`)."""
    ss = ss or _open(sweep, schedule.set_rungs(sweep, stage, configs))
    schedule.restore(ss)
    # Several workers print plain lines side by side; a live display needs the terminal to itself.
    progress = StageProgress(stage.name, len(stage.grid), points_done(ss), sweep.workers,
                             tty=sys.stdout.isatty() and sweep.workers == 1)
    try:
        coord.work(ss, TrialRunner(sweep, stage, base, configs, progress, execute), retry=retry)
    finally:
        progress.close()


def _worker_main(sweep_dict: dict, stage_name: str, base: str | None, env: dict[str, str]) -> None:
    # A worker may get the terminal's signal and then the one its coordinator forwards: the first stops it.
    interrupts.install(on_first=isolation.stop_children, second="ignore")
    os.environ.update(env)
    try:
        jobs.start_forkserver()
        sweep = SweepConfig.from_dict(sweep_dict)
        configs = trials.TrialConfigs(sweep)
        work(sweep, grid.stage_named(sweep, stage_name, list(configs.candidates), configs.shared), base, configs)
    except Interrupted as e:
        sys.exit(e.exit_code)


def visible_gpus() -> list[str]:
    """This machine's GPUs as `CUDA_VISIBLE_DEVICES` names them, without importing torch (the coordinator
    stays light): $CUDA_VISIBLE_DEVICES if set, else the NVIDIA driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


def gpu_env(worker: int, per_trial: int, gpus: list[str]) -> dict[str, str]:
    """Pin worker `worker` to its own `per_trial` of `gpus` (none on a CPU machine)."""
    if not gpus:
        return {}
    ids = [gpus[(worker * per_trial + k) % len(gpus)] for k in range(per_trial)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


def _check_base(ss: coord.StageStudy, base: str) -> None:
    started_from = ss.study.user_attrs.get("base_candidate")
    if started_from is None:
        ss.study.set_user_attr("base_candidate", base)
    elif started_from != base:
        raise ConfigError(
            f"{ss.stage.study_name} was started from '{started_from}' but stage 1 now selects '{base}' (did the "
            "sweep config change?). Use a new sweep name, or delete the stage-2 study to redo it."
        )


def _check_folds(ss: coord.StageStudy, sweep: SweepConfig) -> None:
    """A study's fold runs belong to one fold assignment: resuming it with another `cv.folds` would mix them."""
    folds = sweep.cv.k
    started_with = ss.study.user_attrs.get("cv_folds")
    if started_with is None:
        if not coord.finished(ss.study) or folds == 0:  # an older study (no record) ran without CV
            ss.study.set_user_attr("cv_folds", folds)
        started_with = ss.study.user_attrs.get("cv_folds", 0)
    if started_with != folds:
        raise ConfigError(
            f"{ss.stage.study_name} was run with cv.folds {started_with} but the sweep now says {folds}: its trials "
            "belong to another split of the data. Use a new sweep name for the new cross-validation."
        )


def run_stage(sweep: SweepConfig, stage: Stage, base: str | None, configs: trials.TrialConfigs,
              execute: Execute | None = None, retry: bool = False) -> coord.StageStudy:
    """Make sure the stage's grid is enqueued, then work on it with `sweep.workers` processes, rung by rung
    (successive halving; several workers or SLURM array tasks promote the same points). `retry`: see
    `coord.work`."""
    ss = _open(sweep, schedule.set_rungs(sweep, stage, configs))
    _check_folds(ss, sweep)
    if base is not None:
        _check_base(ss, base)
    schedule.restore(ss)
    for rung in range(max(1, len(stage.rungs))):
        _run_rung(sweep, ss, base, configs, execute, retry)
        if budget.stage_limited(ss.study):  # the budget ran out: the stage ends with its best so far
            break
        if rung + 1 < len(stage.rungs):
            promoted = schedule.promote(sweep, ss, rung)
            log.info(schedule.promotion_line(stage, rung, promoted))
    return ss


def _run_rung(sweep: SweepConfig, ss: coord.StageStudy, base: str | None, configs: trials.TrialConfigs,
              execute: Execute | None, retry: bool = False) -> None:
    """Enqueue what the stage's grid (up to its current rung) lacks and work on it until it is done."""
    stage = ss.stage
    before = {coord.INTERRUPTED: 0, "failed": 0}
    for point in coord.grid_status(ss):
        before[point.state] = before.get(point.state, 0) + 1
    added = coord.ensure_grid(ss, sweep.retry_failed)
    log.info(f"[sweep] {stage.name}: {len(stage.grid)} grid points, {added} newly enqueued "
             f"({before[coord.INTERRUPTED]} interrupted before), {before.get('finished', 0)} finished before")
    if before["failed"] and not sweep.retry_failed:
        log.warning(f"[sweep] {stage.name}: {before['failed']} trials failed with an error; rerun with --retry_failed true "
                    "to retry them")
    since = datetime.now()
    try:
        if sweep.workers == 1:
            work(sweep, stage, base, configs, execute, ss, retry=retry)
        else:
            _run_workers(sweep, stage, base, configs)
    except Interrupted as e:
        raise StageInterrupted(e.signum, stopped_trials(ss, since)) from None


class StageInterrupted(Interrupted):  # noqa: N818 -- a stop request
    """A stage stopped by a signal, with the trials it stopped ("stage1 003-resnet18-r0-f2")."""

    def __init__(self, signum: int, stopped: list[str]):
        super().__init__(signum)
        self.stopped = stopped


STOPPED_BY = "stopped by "  # the reason of a trial stopped by an interrupt: "interrupted: stopped by SIGINT"


def stopped_trials(ss: coord.StageStudy, since: datetime) -> list[str]:
    """The stage's trials that an interrupt stopped since `since` (this process's or its workers')."""
    prefix = f"{coord.INTERRUPTED}: {STOPPED_BY}"
    return [f"{ss.stage.name} {Path(t.user_attrs.get('run_dir', str(t.number))).name}"
            for t in ss.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if str(t.user_attrs.get("fail_reason", "")).startswith(prefix) and t.datetime_complete
            and t.datetime_complete >= since]


WORKER_STOP_SECONDS = 30.0  # an interrupted worker's time to stop its trial (GRACE_SECONDS) and record it


def _run_workers(sweep: SweepConfig, stage: Stage, base: str | None, configs: trials.TrialConfigs) -> None:
    per_trial, gpus = jobs.devices(configs.shared), visible_gpus()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(sweep.to_dict(), stage.name, base, gpu_env(i, per_trial, gpus)))
             for i in range(sweep.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except Interrupted as e:  # `kill` reaches this process only, a terminal's Ctrl-C every worker too
        for p in procs:
            if p.exitcode is None:
                os.kill(p.pid, e.signum)
        for p in procs:
            p.join(WORKER_STOP_SECONDS)
            if p.exitcode is None:
                p.kill()
                p.join()
        raise
