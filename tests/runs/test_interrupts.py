"""Ctrl-C, SIGTERM and SIGHUP: one `interrupted:` line and exit code 128 + signal, never a traceback; a second
signal exits at once; a fit stopped by SIGTERM keeps its checkpoints."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from runs.interrupts import Interrupted
from tests.conftest import REPO, small_fit_args

FIRST_THEN_SECOND = """
import os, signal, sys, time
from runs import interrupts
interrupts.install(on_first=lambda signum: print("cleanup starts", flush=True))
try:
    os.kill(os.getpid(), signal.SIG{first})
    time.sleep(5)
except interrupts.Interrupted as e:
    print(interrupts.message(e, "demo"), flush=True)
    os.kill(os.getpid(), signal.SIG{second})  # a second signal during the cleanup
    time.sleep(5)
    print("cleanup finished", flush=True)
"""


@pytest.mark.parametrize(("name", "code"), [("INT", 130), ("TERM", 143), ("HUP", 129)])
def test_exit_codes_follow_the_shell_convention(name, code):
    assert Interrupted(getattr(signal, f"SIG{name}")).exit_code == code


def test_the_first_signal_raises_interrupted_and_a_second_exits_at_once():
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", FIRST_THEN_SECOND.format(first="TERM", second="INT")], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert time.time() - started < 4  # neither sleep ran out
    assert proc.stdout.splitlines() == ["cleanup starts", "interrupted: demo stopped by SIGTERM (exit code 143)"]
    assert proc.returncode == 130 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_fit_stopped_by_sigterm_is_one_line_and_keeps_its_last_checkpoint(tmp_path, shared_artifacts):
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "fit", *small_fit_args(shared_artifacts, runs, epochs=40)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.rglob("last.ckpt")):
        time.sleep(0.2)
    assert list(runs.rglob("last.ckpt")), "no epoch finished"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out and "interrupted: fit stopped by SIGTERM (exit code 143)" in out, out[-3000:]
    assert list(runs.rglob("last.ckpt"))


def test_a_command_leaves_the_caller_s_signal_handlers_as_they_were(tmp_path):
    from tests.conftest import cli_in_process

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert cli_in_process("sweep", "--config", str(tmp_path / "missing.yaml")) != 0
    assert {s: signal.getsignal(s) for s in before} == before
