"""Claiming, grid bookkeeping and recovery on a real SQLite Optuna storage, without training."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from sweeps import coordinator as coord

STAGE = coord.Stage("stage1", "s/stage1", [{"candidate": c, "repeat": 0} for c in "abcdefgh"], "val/loss", "minimize")


def open_stage(tmp_path, stage=STAGE, **heartbeat) -> coord.StageStudy:
    storage = coord.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", **heartbeat)
    return coord.open_study(storage, stage, coord.make_pruner("none"))


def test_claim_is_exactly_once_across_workers_and_never_creates_trials(tmp_path):
    """Checks the storage contract `claim` rests on (see its docstring) on the installed Optuna."""
    ss = open_stage(tmp_path)
    assert coord.ensure_grid(ss) == 8
    claimed: list[list[int]] = [[], []]

    def worker(k: int) -> None:
        mine = open_stage(tmp_path)  # each worker with its own storage connection, as separate processes have
        while (trial := coord.claim(mine)) is not None:
            claimed[k].append(trial.number)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = [n for c in claimed for n in c]
    assert sorted(numbers) == list(range(8))  # every trial claimed, none twice
    assert coord.claim(ss) is None
    assert len(ss.study.get_trials()) == 8  # claiming never samples a new trial
    assert all(t.state == TrialState.RUNNING for t in ss.study.get_trials())
    # The contract itself, on the installed Optuna (a new release that changed it fails here, whatever its
    # version): a claimed trial cannot be claimed again, a finished one raises.
    first = ss.study.get_trials()[0]
    assert ss.storage.set_trial_state_values(ss.trial_id(first.number), TrialState.RUNNING) is False
    ss.storage.set_trial_state_values(ss.trial_id(first.number), TrialState.COMPLETE, [0.5])
    with pytest.raises(UpdateFinishedTrialError):
        ss.storage.set_trial_state_values(ss.trial_id(first.number), TrialState.RUNNING)


def test_interrupted_points_are_enqueued_again_failed_ones_only_on_request(tmp_path):
    ss = open_stage(tmp_path)
    coord.ensure_grid(ss)
    a, b = coord.claim(ss), coord.claim(ss)
    coord.fail(ss, a.number, f"{coord.INTERRUPTED}: killed by signal 9")
    coord.fail(ss, b.number, "ValueError: boom")
    states = {p.params["candidate"]: p.state for p in coord.grid_status(ss)}
    assert states["a"] == coord.INTERRUPTED and states["b"] == "failed" and states["c"] == "live"
    assert coord.ensure_grid(ss) == 1  # only the interrupted one
    assert {p.params["candidate"]: p.state for p in coord.grid_status(ss)}["b"] == "failed"
    assert coord.ensure_grid(ss, retry_failed=True) == 1
    assert all(p.state == "live" for p in coord.grid_status(ss))


def test_running_trial_of_a_dead_process_is_recovered(tmp_path):
    ss = open_stage(tmp_path)
    coord.ensure_grid(ss)
    trial = coord.claim(ss)
    proc = mp.get_context("fork").Process(target=lambda: None)
    proc.start()
    proc.join()  # a pid that no longer runs, on this host
    ss.set_attr(trial.number, coord.OWNER, {"trial": trial.number, "host": coord.HOST, "pid": proc.pid, "pid_start": None})
    assert coord.recover_stale(ss) == [trial.number]
    old = ss.study.get_trials()[trial.number]
    assert old.state == TrialState.FAIL and coord.is_interrupted(old)
    waiting = ss.study.get_trials(states=(TrialState.WAITING,))
    assert [coord.grid_params(t)["candidate"] for t in waiting].count("a") == 1


def test_a_claimed_trial_names_its_owner_at_once_and_a_copied_owner_is_not_trusted(tmp_path):
    """Another worker on this host reads the trial between the claim and the run: its owner is already there.
    A retry that carries its failed predecessor's owner (Optuna's RetryHeartbeatStaleTrialCallback copies the
    user attrs) is not judged by that dead pid while its own owner is being written."""
    ss = open_stage(tmp_path)
    coord.ensure_grid(ss)
    trial = coord.claim(ss)
    assert trial.user_attrs[coord.OWNER] == {"trial": trial.number, "host": coord.HOST, "pid": os.getpid(),
                                             "pid_start": coord._process_start(os.getpid())}
    proc = mp.get_context("fork").Process(target=lambda: None)
    proc.start()
    proc.join()  # a pid that no longer runs, on this host
    other = coord.claim(ss)
    copied = {"trial": other.number - 1, "host": coord.HOST, "pid": proc.pid, "pid_start": None}
    ss.set_attr(other.number, coord.OWNER, copied)  # its predecessor's, as if copied before its own was written
    assert coord.recover_stale(ss) == []
    ss.set_attr(other.number, coord.OWNER, {**copied, "trial": other.number})  # its own owner, now dead
    assert coord.recover_stale(ss) == [other.number]


def test_duplicate_enqueue_trains_once(tmp_path):
    ss = open_stage(tmp_path, coord.Stage("stage1", "d/stage1", [{"candidate": "a", "repeat": 0}], "val/loss", "minimize"))
    coord.ensure_grid(ss)
    ss.study.enqueue_trial({"candidate": "a", "repeat": 0})  # a second machine enqueued it at the same moment
    ran = []
    coord.work(ss, lambda s, t: (ran.append(t.number), s.study.tell(t.number, 1.0)), poll_seconds=0.01)
    assert ran == [0]
    assert ss.study.get_trials()[1].user_attrs["duplicate_of"] == 0


def test_trial_of_another_host_whose_heartbeat_stopped_is_failed_and_retried(tmp_path):
    ss = open_stage(tmp_path, heartbeat_seconds=1, grace_intervals=1)
    coord.ensure_grid(ss)
    trial = coord.claim(ss)
    with coord.Heartbeat(ss, trial.number, seconds=1):
        ss.set_attr(trial.number, coord.OWNER, {"trial": trial.number, "host": "another-machine", "pid": 1})  # its pid means nothing here
    assert coord.recover_stale(ss) == []  # its heartbeat is fresh
    time.sleep(2.1)  # past the 1 s grace period (heartbeats are stored to the second)
    assert coord.recover_stale(ss) == [trial.number]
    old = ss.study.get_trials()[trial.number]
    assert old.state == TrialState.FAIL and coord.is_interrupted(old)
    states = {p.params["candidate"]: p.state for p in coord.grid_status(ss)}
    assert states["a"] == "live"  # Optuna's RetryHeartbeatStaleTrialCallback enqueued it again
    retry = ss.study.get_trials(states=(TrialState.WAITING,))[-1]
    assert coord.grid_params(retry) == coord.grid_params(old)


def open_journal(tmp_path, stage=STAGE) -> coord.StageStudy:
    ss = coord.open_study(coord.make_storage(f"journal://{tmp_path / 'shared' / 'study.log'}"), stage,
                          coord.make_pruner("none"))
    ss.grace_seconds = 0.6
    return ss


def _claim_all(tmp_path) -> list[int]:
    mine, numbers = open_journal(tmp_path), []  # its own storage object, as each worker process has
    while (trial := coord.claim(mine)) is not None:
        numbers.append(trial.number)
    return numbers


def test_claim_is_exactly_once_on_a_journal_file_across_processes(tmp_path):
    """The journal's replay rejects a second WAITING -> RUNNING: every trial claimed once by 3 processes."""
    ss = open_journal(tmp_path)
    assert coord.ensure_grid(ss) == 8
    with mp.get_context("fork").Pool(3) as pool:
        claimed = pool.map(_claim_all, [tmp_path] * 3)
    assert sorted(n for c in claimed for n in c) == list(range(8))
    assert len(ss.study.get_trials()) == 8 and coord.claim(ss) is None


def test_journal_trial_of_another_host_is_retried_once_its_own_liveness_record_is_stale(tmp_path):
    """Optuna has no heartbeat for the journal: `Heartbeat` refreshes `alive_at`, stale after the grace period."""
    ss = open_journal(tmp_path)
    assert not coord.has_optuna_heartbeat(ss.storage)
    coord.ensure_grid(ss)
    trial = coord.claim(ss)

    def alive_at() -> float:
        return ss.study.get_trials()[trial.number].user_attrs[coord.ALIVE_AT]

    with coord.Heartbeat(ss, trial.number, seconds=0.1):
        ss.set_attr(trial.number, coord.OWNER, {"trial": trial.number, "host": "another-node", "pid": 1})
        first = alive_at()
        time.sleep(0.35)
        assert alive_at() > first  # refreshed while the trial runs
        assert coord.recover_stale(ss) == []
    ss.set_attr(trial.number, coord.ALIVE_AT, time.time() - 2 * ss.grace_seconds)  # its worker went silent
    assert coord.recover_stale(ss) == [trial.number]
    old = ss.study.get_trials()[trial.number]
    assert old.state == TrialState.FAIL and "silent for" in old.user_attrs["fail_reason"] and coord.is_interrupted(old)
    assert {p.params["candidate"]: p.state for p in coord.grid_status(ss)}["a"] == "live"  # enqueued again
    assert coord.recover_stale(open_journal(tmp_path)) == []  # another worker does not retry it twice
