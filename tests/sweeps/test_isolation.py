"""Process isolation is generic: any module-level function runs in a forked child, its failure becomes a
reason, and the module imports nothing from `sweeps`."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from sweeps import isolation
from tests.conftest import REPO
from tests.sweeps.child_jobs import raise_value_error, write_pid


def test_a_function_runs_in_a_child_and_its_failure_is_the_reason(tmp_path):
    isolation.start_forkserver([])
    ok = isolation.run_in_process(write_pid, {"file": str(tmp_path / "pid")}, tmp_path, "job")
    assert ok.status == "ok" and int((tmp_path / "pid").read_text()) != os.getpid()
    failed = isolation.run_in_process(raise_value_error, {"why": "bad value"}, tmp_path, "job")
    assert (failed.status, failed.reason) == ("failed", "ValueError: bad value")
    assert "Traceback" in (tmp_path / "job.log").read_text()  # the child's own output goes to its log


def test_isolation_imports_nothing_from_sweeps():
    tree = ast.parse((REPO / "sweeps" / "isolation.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if m.split(".")[0] == "sweeps"]


def test_an_interrupt_stops_the_child_which_records_itself_interrupted(tmp_path):
    """The caller's first SIGTERM stops the running child (its process group) and raises `Interrupted`
    where the caller waits; the child writes its result as interrupted and is gone within the grace time."""
    import signal
    import threading
    import time

    import pytest

    from runs import interrupts
    from tests.sweeps.child_jobs import sleep_long

    isolation.start_forkserver([])
    started = tmp_path / "started"

    def interrupt_when_started() -> None:
        while not started.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    saved = interrupts.install(on_first=isolation.stop_children)
    try:
        with pytest.raises(interrupts.Interrupted) as stopped:
            isolation.run_in_process(sleep_long, {"file": str(started)}, tmp_path, "job")
    finally:
        interrupts.restore(saved)
    assert stopped.value.exit_code == 143
    child = int(started.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    outcome = isolation.outcome_of(tmp_path / ".job_result.json", None, tmp_path / "job.log")
    assert (outcome.status, outcome.reason) == ("interrupted", "stopped by SIGTERM")


def test_a_child_whose_status_the_dead_forkserver_lost_is_interrupted_when_it_said_so(tmp_path):
    """`scancel` signals every process of a SLURM job: the forkserver can die before it reports the trial's
    exit status, which multiprocessing then gives as 255. The child's own line (or this worker's stop request)
    tells an interruption from a crash."""
    log = tmp_path / "fit.log"
    log.write_text("[rank: 0] Received SIGTERM: 15\ninterrupted: this process stopped by SIGTERM (exit code 143)\n")
    assert isolation.outcome_of(None, 255, log).status == "interrupted"
    log.write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    assert isolation.outcome_of(None, 255, log).status == "failed"
    assert isolation.outcome_of(None, 255, log, stopped=True).status == "interrupted"
    assert isolation.outcome_of(None, 1, log, stopped=True).reason.startswith("stopped on this worker's stop request")
