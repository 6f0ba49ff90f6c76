"""Coordinating workers through the Optuna storage: each grid point trained exactly once, resumably.

Every grid point of a stage is enqueued (`Study.enqueue_trial`) as a WAITING trial of the stage's study.
A worker claims one by moving it WAITING -> RUNNING (`claim`, the one place that depends on the storage's
row-locked state change), so two workers, on one machine (SQLite) or many (PostgreSQL), never claim the
same trial. Should two processes enqueue the same grid point at once, the lowest-numbered live trial trains
and the others finish as pruned duplicates without training. Results go back with `Study.tell`.

Only Optuna's public API is used: the storage object is the one this module creates and keeps (studies
do not expose theirs), trial ids come from `storage.get_trial_id_from_study_id_trial_number`.

A running trial records its host and pid, and Optuna's storage heartbeat (`RDBStorage(heartbeat_interval,
grace_period)`, `record_heartbeat`). A trial whose process is gone is interrupted: on the same host that is
seen at once (the pid), it is marked FAIL with that reason and enqueued again; on other hosts Optuna's
`fail_stale_trials` fails it once its heartbeat is older than the grace period and its
`RetryHeartbeatStaleTrialCallback` enqueues it again. A trial process killed by a signal (SIGKILL, the OOM killer) is interrupted
too and is retried on the next run.

On a shared filesystem without a database server the storage is Optuna's `JournalStorage` on a
`JournalFileBackend` (`journal:///shared/path/study.log`). Claiming holds there too: the journal is an append-only
log written under a file lock and replayed in order, and a second WAITING -> RUNNING of one trial is rejected on
replay, so `set_trial_state_values` returns False to all but the first claimer. Optuna's heartbeat exists for
`RDBStorage` only (`BaseHeartbeat`; `fail_stale_trials` skips other storages), so on the journal the worker's
`Heartbeat` writes its own liveness record instead: the user attr `alive_at` (epoch seconds), refreshed every
`heartbeat_seconds`; a RUNNING trial whose record is older than the grace period is failed as interrupted and
enqueued again, as Optuna's callback does on RDB. Finished trials are never retrained; trials that failed with an error
are retried only on request (`retry_failed`).
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from sweeps.grid import Stage
from sweeps.log import log

HOST = socket.gethostname()
INTERRUPTED = "interrupted"
LIVE = (TrialState.WAITING, TrialState.RUNNING)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class StageStudy:
    """A stage's study with the storage it was opened on."""

    stage: Stage
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    study_id: int
    url: str = ""
    grace_seconds: float = 60.0  # a trial silent this long (journal storage: its `alive_at`) is stale

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def set_attr(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial_id(number), key, value)


JOURNAL = "journal://"
ALIVE_AT = "alive_at"  # the liveness record of a trial on storages without Optuna's heartbeat (journal)
OWNER = "owner"  # {trial, host, pid, pid_start} of the worker process that claimed a trial


def journal_path(url: str) -> str:
    """The log file of a `journal:///shared/path/study.log` URL (a relative path is taken from here)."""
    return os.path.abspath(os.path.expanduser(url[len(JOURNAL):]))


def make_journal(url: str) -> optuna.storages.JournalStorage:
    """Optuna's journal storage on a shared file (NFS, Lustre, GPFS): no database server."""
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def make_storage(url: str, attempts: int = 8, heartbeat_seconds: float | None = None,
                 grace_intervals: int = 6) -> optuna.storages.BaseStorage:
    """An RDB storage (SQLite waits for its write lock instead of failing under several workers), or a journal
    file for `journal://` URLs (whose liveness is `Heartbeat`'s own record: see the module docstring).

    Machines that start a sweep at the same moment on an empty database race to create Optuna's tables;
    the loser retries and finds them.

    Args:
        url: the storage URL.
        attempts: tries to open it.
        heartbeat_seconds: enable Optuna's trial heartbeat at this interval (whole seconds, at least 1);
            a trial silent for `grace_intervals` intervals is stale, failed and enqueued again.
        grace_intervals: see `heartbeat_seconds`.
    """
    if url.startswith(JOURNAL):
        return make_journal(url)
    heartbeat: dict[str, Any] = {}
    if heartbeat_seconds:
        interval = max(1, math.ceil(heartbeat_seconds))
        with warnings.catch_warnings():  # experimental since Optuna 2.8, unchanged through 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
        heartbeat = {"heartbeat_interval": interval, "grace_period": grace_intervals * interval,
                     "heartbeat_stale_trial_callback": retry}
    import random

    import sqlalchemy.exc

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 120}
    else:
        kwargs["pool_pre_ping"] = True
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat arguments are "experimental" (since Optuna 2.9)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **heartbeat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random() * 1.5)
    raise AssertionError("unreachable")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The stage's pruner; Hyperband reads the epochs per trial from the first finished trial."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def open_study(storage: optuna.storages.BaseStorage, stage: Stage, pruner: optuna.pruners.BasePruner,
               seed: int = 0) -> StageStudy:
    """Create or load the stage's study. Every trial is enqueued with all its parameters fixed, so the
    sampler never samples; the grid is visible in optuna-dashboard as the enqueued trials."""
    study = optuna.create_study(
        study_name=stage.study_name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=seed),
        pruner=pruner, direction=stage.direction, load_if_exists=True,
    )
    url = str(getattr(storage, "url", ""))
    return StageStudy(stage, study, storage, storage.get_study_id_from_name(stage.study_name), url)


def has_optuna_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    return bool(getattr(storage, "get_heartbeat_interval", lambda: None)())


def grid_params(trial: FrozenTrial) -> dict[str, Any]:
    return dict(trial.system_attrs.get("fixed_params") or trial.params)


def is_interrupted(trial: FrozenTrial) -> bool:
    """FAIL with an "interrupted" reason, or with none: every failure this package records carries a reason,
    so a reasonless FAIL is one that Optuna's `fail_stale_trials` recorded (its heartbeat stopped)."""
    reason = trial.user_attrs.get("fail_reason")
    return trial.state == TrialState.FAIL and (reason is None or str(reason).startswith(INTERRUPTED))


@dataclass
class PointStatus:
    """Where one grid point stands: finished, live (waiting/running), interrupted, failed or missing."""

    params: dict[str, Any]
    state: str
    reason: str = ""


def grid_status(ss: StageStudy) -> list[PointStatus]:
    """The state of every grid point, judged by its trials (duplicates aside; the latest failure counts)."""
    by_key: dict[tuple, list[FrozenTrial]] = defaultdict(list)
    for t in ss.study.get_trials(deepcopy=False):
        if t.user_attrs.get("duplicate_of") is None:
            by_key[ss.stage.key(grid_params(t))].append(t)
    out = []
    for params in ss.stage.grid:
        trials = by_key.get(ss.stage.key(params), [])
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if any(t.state in DONE for t in trials):
            out.append(PointStatus(params, "finished"))
        elif any(t.state in LIVE for t in trials):
            out.append(PointStatus(params, "live"))
        elif failed:
            last = max(failed, key=lambda t: t.number)
            state = INTERRUPTED if is_interrupted(last) else "failed"
            out.append(PointStatus(params, state, str(last.user_attrs.get("fail_reason", ""))))
        else:
            out.append(PointStatus(params, "missing"))
    return out


def report_incomplete(ss: StageStudy) -> list[dict[str, str]]:
    """Grid points of a stage with no finished trial, printed with what to do about them."""
    missing = [p for p in grid_status(ss) if p.state != "finished"]
    if not missing:
        return []
    log.warning(f"[sweep] {ss.stage.name}: {len(missing)} of {len(ss.stage.grid)} grid points have no finished trial:")
    rows = []
    for p in missing:
        point = ", ".join(f"{k}={v}" for k, v in p.params.items())
        rows.append({"stage": ss.stage.name, "grid point": point, "state": p.state, "reason": p.reason})
        log.warning(f"  - {point}: {p.state}{' (' + p.reason + ')' if p.reason else ''}")
    interrupted = sum(p.state == INTERRUPTED for p in missing)
    failed = sum(p.state == "failed" for p in missing)
    if interrupted:
        log.warning(f"[sweep] {interrupted} trials were interrupted; rerun the same command to retry them.")
    if failed:
        log.warning(f"[sweep] {failed} trials failed with an error; rerun with --retry_failed true to retry them.")
    return rows


def ensure_grid(ss: StageStudy, retry_failed: bool = False) -> int:
    """Enqueue every grid point that has no live or finished trial, unless it failed with an error and
    `retry_failed` is off; interrupted points are always enqueued again. Returns how many were enqueued."""
    added = 0
    for point in grid_status(ss):
        if point.state in ("missing", INTERRUPTED) or (point.state == "failed" and retry_failed):
            ss.study.enqueue_trial(point.params, user_attrs={"grid_point": "|".join(map(str, ss.stage.key(point.params)))})
            added += 1
    return added


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        return None


def _alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    now = _process_start(int(pid))
    if now is not None:
        return start is None or now == start
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False


def fail(ss: StageStudy, number: int, reason: str, state: TrialState = TrialState.FAIL) -> None:
    """Finish a trial as failed (or pruned) with its reason; no-op if another worker finished it first."""
    try:
        ss.set_attr(number, "fail_reason", reason)
    except UpdateFinishedTrialError:
        return
    ss.study.tell(number, state=state, skip_if_finished=True)


def _stale_reason(ss: StageStudy, trial: FrozenTrial, own_heartbeat: bool, now: float) -> str | None:
    """Why a RUNNING trial's worker is gone (None: it may be alive). Its owner on this host: its pid. Otherwise
    (another host, or no owner recorded for this trial yet), on a storage without Optuna's heartbeat: its
    `alive_at` record (or its start) older than the grace period."""
    ua = trial.user_attrs
    owner = ua.get(OWNER) or {}
    # The owner must name this trial: Optuna's RetryHeartbeatStaleTrialCallback copies the failed trial's
    # user attrs, its dead worker's owner included, into the retry.
    if owner.get("trial") == trial.number and owner.get("host") == HOST:
        pid = owner.get("pid")
        return None if _alive(pid, owner.get("pid_start")) else f"worker {HOST}:{pid} stopped"
    if not own_heartbeat:
        return None  # Optuna's fail_stale_trials judges it
    last = ua.get(ALIVE_AT)
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    if last is None or now - float(last) <= ss.grace_seconds:
        return None
    return f"worker {ua.get('host', '?')}:{ua.get('pid', '?')} silent for {now - float(last):.0f}s"


def recover_stale(ss: StageStudy) -> list[int]:
    """Fail interrupted RUNNING trials and enqueue each once more; returns their numbers.

    Same host: the trial's worker process is gone (seen at once). Other hosts: Optuna's heartbeat is older
    than the grace period (`fail_stale_trials`, whose `RetryHeartbeatStaleTrialCallback` enqueues the retry),
    or on a journal storage the trial's own `alive_at` record is.
    """
    recovered = []
    running = ss.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    own_heartbeat, now = not has_optuna_heartbeat(ss.storage), time.time()
    for t in running:
        reason = _stale_reason(ss, t, own_heartbeat, now)
        if reason is None:
            continue
        tid = ss.trial_id(t.number)
        try:
            ss.storage.set_trial_user_attr(tid, "fail_reason", f"{INTERRUPTED}: {reason}")
            ss.storage.set_trial_state_values(tid, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker recovered it first
        ss.study.enqueue_trial(grid_params(t), user_attrs={"grid_point": t.user_attrs.get("grid_point"),
                                                           "retry_of": t.number})
        recovered.append(t.number)
    with warnings.catch_warnings():  # experimental since Optuna 2.9, unchanged through 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(ss.study)
    states = {t.number: t.state for t in ss.study.get_trials(deepcopy=False)}
    return recovered + [t.number for t in running if t.number not in recovered and states[t.number] == TrialState.FAIL]


def claim(ss: StageStudy) -> FrozenTrial | None:
    """Atomically take the lowest-numbered WAITING trial (WAITING -> RUNNING), or None.

    Exactly-once claiming rests on one documented storage contract (`BaseStorage.set_trial_state_values`;
    read in Optuna 5.0.0 and 5.1.0, and tested on whichever Optuna is installed):
    `set_trial_state_values(id, RUNNING)` returns False when the trial is RUNNING already and raises
    `UpdateFinishedTrialError` when it has finished; the RDB storage does the check and the update under a
    row lock. `Study.ask` pops WAITING trials the same way, but creates a new, sampled trial when none is
    waiting, which a fixed grid must never do. SQLite has no row locks: its deferred transactions let two
    connections both read WAITING and both write RUNNING, so on SQLite claims are serialised by a lock file
    beside the database (SQLite storage is one machine's anyway). `tests/sweeps/test_coordinator.py` fails
    if this breaks.
    """
    with _sqlite_claim_lock(ss.url):
        for t in ss.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            tid = ss.trial_id(t.number)
            try:
                if ss.storage.set_trial_state_values(tid, TrialState.RUNNING):
                    _mark_owner(ss.storage, tid, t.number)
                    return ss.storage.get_trial(tid)
            except UpdateFinishedTrialError:
                continue
    return None


def _mark_owner(storage: optuna.storages.BaseStorage, trial_id: int, number: int) -> None:
    """Record at once which process owns a claimed trial (one attribute, so that no worker reads half of it;
    preparing the trial can take a while) and its first sign of life; `Heartbeat` keeps it alive while it trains."""
    owner = {"trial": number, "host": HOST, "pid": os.getpid(), "pid_start": _process_start(os.getpid())}
    storage.set_trial_user_attr(trial_id, OWNER, owner)
    for key in ("host", "pid"):  # for people and tools reading the study
        storage.set_trial_user_attr(trial_id, key, owner[key])
    if os.environ.get("SLURM_ARRAY_JOB_ID"):  # which array task trains it: `scancel` / `sacct` need its id
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
        storage.set_trial_user_attr(trial_id, "slurm_job", job)
    record_alive(storage, trial_id)


def record_alive(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """One sign of life of a running trial: Optuna's storage heartbeat (RDB storages opened with one), else its own
    `alive_at` record (journal storage, which Optuna gives no heartbeat); nothing on other storages."""
    if has_optuna_heartbeat(storage):
        storage.record_heartbeat(trial_id)
    elif isinstance(storage, optuna.storages.JournalStorage):
        storage.set_trial_user_attr(trial_id, ALIVE_AT, time.time())


@contextmanager
def _sqlite_claim_lock(url: str):
    """An exclusive lock on `<database>.claim-lock` for sqlite:/// URLs; nothing for server databases."""
    if not url.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(url[len("sqlite:///"):] + ".claim-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def duplicate_of(ss: StageStudy, trial: FrozenTrial) -> int | None:
    """The trial that owns this grid point if it is not `trial` (finished, or live with a lower number)."""
    key = ss.stage.key(grid_params(trial))
    for other in ss.study.get_trials(deepcopy=False):
        if other.number == trial.number or ss.stage.key(grid_params(other)) != key or other.user_attrs.get("duplicate_of") is not None:
            continue
        if other.state in DONE:
            return other.number
        if other.state in LIVE and other.number < trial.number:
            return other.number
    return None


class Heartbeat:
    """Marks a claimed trial (its owner recorded by `claim`) as alive every `seconds` (`record_alive`) while it runs."""

    def __init__(self, ss: StageStudy, number: int, seconds: float):
        self.storage, self.trial_id, self.seconds = ss.storage, ss.trial_id(number), seconds
        self._stop = threading.Event()
        record_alive(self.storage, self.trial_id)
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                record_alive(self.storage, self.trial_id)
            except Exception:  # noqa: BLE001 -- a missed beat must not kill the trial; staleness has a grace
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def live_trials(ss: StageStudy) -> list[FrozenTrial]:
    return ss.study.get_trials(deepcopy=False, states=LIVE)


def retry_interrupted(ss: StageStudy) -> int:
    """Enqueue again the grid points whose last trial was interrupted (its worker stopped by a signal, as
    SLURM's scancel or requeue do); returns how many."""
    added = 0
    for point in grid_status(ss):
        if point.state == INTERRUPTED:
            ss.study.enqueue_trial(point.params, user_attrs={"grid_point": "|".join(map(str, ss.stage.key(point.params)))})
            added += 1
    return added


def work(
    ss: StageStudy, run_trial: Callable[[StageStudy, FrozenTrial], None],
    poll_seconds: float = 2.0, retry: bool = False,
) -> None:
    """Worker loop: claim grid points until none is waiting or running (others' trials included).

    `retry`: trials that other workers recorded as interrupted are enqueued again at once (a cluster's
    workers: the one that was stopped may never come back), instead of on the sweep's next run.
    """
    while True:
        for number in recover_stale(ss):
            log.warning(f"[sweep] {ss.stage.name} trial {number} was interrupted; enqueued again")
        if retry and retry_interrupted(ss):
            log.warning(f"[sweep] {ss.stage.name}: interrupted trials of stopped workers enqueued again")
        trial = claim(ss)
        if trial is None:
            if not live_trials(ss):
                if retry and retry_interrupted(ss):  # a trial interrupted since the check above
                    continue
                return
            time.sleep(poll_seconds)  # other workers' trials are running; they may still fail and return
            continue
        owner = duplicate_of(ss, trial)
        if owner is not None:
            ss.set_attr(trial.number, "duplicate_of", owner)
            ss.study.tell(trial.number, state=TrialState.PRUNED)
            continue
        try:
            run_trial(ss, trial)
        except UpdateFinishedTrialError:  # another worker judged it stopped meanwhile (its liveness went stale)
            log.warning(f"[sweep] {ss.stage.name} trial {trial.number}: another worker recorded it as interrupted "
                        "while it ran; its retry decides the grid point")


def finished(study: optuna.Study, states: Iterable[TrialState] = (TrialState.COMPLETE,)) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=tuple(states)) if t.user_attrs.get("duplicate_of") is None]
