"""Module-level functions for `sweeps.isolation` to run in a child: this module imports nothing heavy, so the
child starts in a moment without a preloading forkserver."""

from __future__ import annotations

import os
from pathlib import Path


def write_pid(payload: dict) -> None:
    Path(payload["file"]).write_text(str(os.getpid()))


def raise_value_error(payload: dict) -> None:
    raise ValueError(payload["why"])


def sleep_long(payload: dict) -> None:
    """Stands in for a long trial: it writes that it started, then waits to be stopped."""
    import time

    Path(payload["file"]).write_text(str(os.getpid()))
    time.sleep(120)
