"""Coordinating workers through the Optuna storage: each grid point trained exactly once, resumably.

Every grid point of a stage is enqueued as a WAITING trial of the stage's study. A worker claims one by
moving it WAITING -> RUNNING with `storage.set_trial_state_values`, which the RDB storage does under a row
lock and refuses for a trial that is no longer WAITING — so two workers, on one machine (SQLite) or many
(PostgreSQL), never claim the same trial. Should two processes enqueue the same grid point at once, the
lowest-numbered live trial trains and the others finish as pruned duplicates without training.

A running trial records its host, pid and a heartbeat. A trial whose process is gone (same host) or whose
heartbeat stopped (other hosts) is interrupted: it is marked FAIL with that reason and enqueued again.
Finished trials are never retrained; trials that failed with an error are retried only on request.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

HOST = socket.gethostname()
INTERRUPTED = "interrupted"
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Stage:
    """One stage of a sweep as an Optuna study.

    Attributes:
        name: "stage1" or "stage2".
        study_name: the study's name in the storage.
        grid: the parameters of every grid point.
        objective: the metric told to Optuna (and reported for pruning).
        direction: "minimize" or "maximize" for `objective`.
    """

    name: str
    study_name: str
    grid: list[dict[str, Any]]
    objective: str
    direction: str

    @property
    def param_names(self) -> list[str]:
        return list(self.grid[0]) if self.grid else []

    def key(self, params: dict[str, Any]) -> tuple:
        return tuple(params.get(k) for k in self.param_names)

    def search_space(self) -> dict[str, list[Any]]:
        return {k: list(dict.fromkeys(p[k] for p in self.grid)) for k in self.param_names}


def make_storage(url: str, attempts: int = 8) -> optuna.storages.BaseStorage:
    """An RDB storage; SQLite waits for its write lock instead of failing under several workers.

    Machines that start a sweep at the same moment on an empty database race to create Optuna's tables;
    the loser retries and finds them.
    """
    import random

    import sqlalchemy.exc

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 120}
    else:
        kwargs["pool_pre_ping"] = True
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random() * 1.5)
    raise AssertionError("unreachable")


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_epochs))
    return optuna.pruners.NopPruner()


class EnqueuedGridSampler(optuna.samplers.GridSampler):
    """The stage's exhaustive grid, realised as enqueued trials that workers claim one by one.

    GridSampler ends a `study.optimize` loop once its grid is exhausted; workers here claim trials
    explicitly instead of running `optimize`, so there is no loop to stop.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


def open_study(storage, stage: Stage, pruner: optuna.pruners.BasePruner, seed: int = 0) -> optuna.Study:
    """Create or load the stage's study. Its grid sampler records the exhaustive grid (visible in
    optuna-dashboard); the trials themselves are the enqueued grid points."""
    sampler = EnqueuedGridSampler(stage.search_space(), seed=seed)
    return optuna.create_study(
        study_name=stage.study_name, storage=storage, sampler=sampler, pruner=pruner,
        direction=stage.direction, load_if_exists=True,
    )


def grid_params(trial: FrozenTrial) -> dict[str, Any]:
    return dict(trial.system_attrs.get("fixed_params") or trial.params)


def _final_failure(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and not str(trial.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED)


def ensure_grid(study: optuna.Study, stage: Stage, retry_failed: bool = False) -> int:
    """Enqueue every grid point that has no live or finished trial; returns how many were enqueued."""
    by_key: dict[tuple, list[FrozenTrial]] = defaultdict(list)
    for t in study.get_trials(deepcopy=False):
        by_key[stage.key(grid_params(t))].append(t)
    added = 0
    for params in stage.grid:
        trials = by_key.get(stage.key(params), [])
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED) for t in trials):
            continue
        if trials and not retry_failed and any(_final_failure(t) for t in trials):
            continue  # failed with an error: final unless retry_failed
        study.enqueue_trial(params, user_attrs={"grid_point": "|".join(map(str, stage.key(params)))})
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


def recover_stale(study: optuna.Study, grace_seconds: float) -> list[int]:
    """Fail interrupted RUNNING trials and enqueue each once more; returns their numbers."""
    recovered = []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        if ua.get("host") == HOST:
            stale = not _alive(ua.get("pid"), ua.get("pid_start"))
        else:
            beat = ua.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
            stale = now - float(beat) > grace_seconds
        if not stale:
            continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"{INTERRUPTED}: worker {ua.get('host')}:{ua.get('pid')} stopped")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker recovered it first
        params = grid_params(t)
        study.enqueue_trial(params, user_attrs={"grid_point": ua.get("grid_point"), "retry_of": t.number})
        recovered.append(t.number)
    return recovered


def _tag_grid_id(study: optuna.Study, trial: FrozenTrial) -> None:
    """Give an enqueued trial the `grid_id` GridSampler would have assigned, so the sampler's bookkeeping
    (which grid points are visited; what optuna-dashboard shows) matches the enqueued grid."""
    sampler = study.sampler
    grids, names = getattr(sampler, "_all_grids", None), getattr(sampler, "_param_names", None)
    if grids is None or names is None or "grid_id" in trial.system_attrs:
        return
    params = grid_params(trial)
    point = tuple(params.get(n) for n in names)
    if point in grids:
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", grids.index(point))
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", sampler._search_space)


def claim(study: optuna.Study) -> FrozenTrial | None:
    """Atomically take the lowest-numbered WAITING trial (WAITING -> RUNNING), or None."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                _tag_grid_id(study, t)
                return storage.get_trial(t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def duplicate_of(study: optuna.Study, stage: Stage, trial: FrozenTrial) -> int | None:
    """The trial that owns this grid point if it is not `trial` (finished, or live with a lower number)."""
    key = stage.key(grid_params(trial))
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or stage.key(grid_params(other)) != key or other.user_attrs.get("duplicate_of") is not None:
            continue
        if other.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return other.number
        if other.state in (TrialState.WAITING, TrialState.RUNNING) and other.number < trial.number:
            return other.number
    return None


class Heartbeat:
    """Marks a claimed trial as alive: host, pid and a timestamp refreshed every `seconds`."""

    def __init__(self, study: optuna.Study, trial_id: int, seconds: float):
        self.storage, self.trial_id, self.seconds = study._storage, trial_id, seconds
        self._stop = threading.Event()
        self.storage.set_trial_user_attr(trial_id, "host", HOST)
        self.storage.set_trial_user_attr(trial_id, "pid", os.getpid())
        self.storage.set_trial_user_attr(trial_id, "pid_start", _process_start(os.getpid()))
        self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # noqa: BLE001 -- a missed beat must not kill the trial; staleness has a grace
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def live_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))


def work(
    study: optuna.Study, stage: Stage, run_trial: Callable[[optuna.Study, FrozenTrial], None],
    grace_seconds: float, poll_seconds: float = 2.0, log: Callable[[str], None] = print,
) -> None:
    """Worker loop: claim grid points until none is waiting or running (others' trials included)."""
    while True:
        for number in recover_stale(study, grace_seconds):
            log(f"[sweep] {stage.name} trial {number} was interrupted; enqueued again")
        trial = claim(study)
        if trial is None:
            if not live_trials(study):
                return
            time.sleep(poll_seconds)  # other workers' trials are running; they may still fail and return
            continue
        owner = duplicate_of(study, stage, trial)
        if owner is not None:
            study._storage.set_trial_user_attr(trial._trial_id, "duplicate_of", owner)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.PRUNED)
            continue
        run_trial(study, trial)


def finished(study: optuna.Study, states: Iterable[TrialState] = (TrialState.COMPLETE,)) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=tuple(states)) if t.user_attrs.get("duplicate_of") is None]
