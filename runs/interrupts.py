"""Stopping on SIGINT (Ctrl-C), SIGTERM (`kill`, a scheduler) and SIGHUP (a closed terminal): the first
signal raises `Interrupted` in the main thread, so every command unwinds through its own cleanup and ends
with one line and exit code 128 + the signal's number (130, 143, 129); a second signal exits at once.

`Interrupted` is a BaseException that is not a KeyboardInterrupt: Lightning's trainer turns a
KeyboardInterrupt into `sys.exit(1)`, while any other BaseException goes through its `on_exception` hooks
and teardown and is raised again to the command.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):  # noqa: N818 -- it is a stop request, not an error
    """The process was asked to stop by `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP)."""
        return 128 + self.signum


def install(on_first: Callable[[int], None] | None = None, second: str = "exit") -> dict:
    """Handle SIGINT, SIGTERM and SIGHUP in this (main-thread) process from now on.

    Args:
        on_first: called with the signal's number on the first signal, before `Interrupted` is raised (e.g.
            to stop child processes, which may be waited on in other threads).
        second: what a second signal does: "exit" at once, or "ignore" it (a sweep's worker process, which
            may get the terminal's signal and then its coordinator's, and finishes its bounded cleanup).

    Returns:
        The handlers it replaced, for `restore`.
    """

    def again(signum: int, frame) -> None:
        sys.stderr.write(f"\ninterrupted again by {signal.Signals(signum).name}: stopping now\n")
        os._exit(128 + signum)  # no cleanup and no traceback: the user asked twice

    def first(signum: int, frame) -> None:
        for s in SIGNALS:
            signal.signal(s, again if second == "exit" else signal.SIG_IGN)
        if on_first is not None:
            on_first(signum)
        raise Interrupted(signum)

    return {s: signal.signal(s, first) for s in SIGNALS}


def restore(previous: dict) -> None:
    """Put back the handlers `install` replaced (what it returned)."""
    for s, handler in previous.items():
        signal.signal(s, handler)


def message(e: Interrupted, what: str) -> str:
    """The one line a command prints when it is interrupted."""
    return f"interrupted: {what} stopped by {e.name} (exit code {e.exit_code})"
