"""The sweep's console: the `medsel.sweep` logger, whose handler prints each message as a plain line on stdout."""

from __future__ import annotations

import logging
import sys

NAME = "medsel.sweep"


class _Stdout(logging.StreamHandler):
    """A StreamHandler on `sys.stdout` as it is when a line is written, not when the handler was made: a
    trial process redirects its output into its log, and pytest swaps stdout per test."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property always reads sys.stdout
        pass


def _console() -> logging.Logger:
    logger = logging.getLogger(NAME)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, by this handler, like Optuna's and Lightning's own loggers
    return logger


log = _console()
