"""Progress you can watch while a sweep trains.

The trial process appends one JSON line per validation epoch to its run directory's `progress.jsonl`
(`sweeps.epoch_progress.EpochProgress`, added to every trial's callbacks like the pruning callback; a
module of its own because it imports Lightning and this one must not); the worker follows that file
while the trial runs (`follow`) and shows, per stage, n/N grid points done, elapsed time, an ETA, the
current trial's epoch and latest validation metrics, and the best trial so far (`StageProgress`). On a
terminal this is a live rich panel; when stdout is not a TTY (CI, nohup) it is plain lines. The trial's
own output stays in its `fit.log`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHOWN = ("val/loss", "val/acc", "val/mcc", "val/auroc", "train/loss", "train/acc")


class follow:  # noqa: N801 -- used as a context manager, like open()
    """Call `on_record` with each JSON line appended to `path` while the block runs (polling, since the
    trial process and this one share nothing but the file)."""

    def __init__(self, path: Path, on_record: Callable[[dict[str, Any]], None], every: float = 0.5):
        self.path, self.on_record, self.every = Path(path), on_record, every
        self._stop = threading.Event()
        self._offset = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self._offset)
            while True:
                line = fh.readline()
                if not line.endswith("\n"):  # not written completely yet: read it next time
                    break
                self._offset += len(line.encode())
                try:
                    self.on_record(json.loads(line))
                except (ValueError, KeyError):
                    continue

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def __enter__(self) -> follow:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()


def clock(seconds: float | None) -> str:
    """Seconds as h:mm:ss ('--' when unknown)."""
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.4f}" for k in SHOWN if k in metrics)


class StageProgress:
    """One stage's progress display.

    Args:
        stage: the stage's name.
        total: grid points in the stage.
        done: grid points already finished (earlier runs included).
        workers: parallel workers (the ETA divides the remaining work among them).
        tty: live display (None: when stdout is a terminal).
        out: where plain lines go.
    """

    def __init__(self, stage: str, total: int, done: int = 0, workers: int = 1, tty: bool | None = None,
                 out=None):
        self.stage, self.total, self.done, self.workers = stage, total, done, max(1, workers)
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.durations: list[float] = []
        self.best = ""
        self.current = ""
        self.epoch = ""
        self._live = None
        self._lock = threading.Lock()
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(file=self.out), refresh_per_second=2, transient=False)
            self._live.start()
        self._plain(self.status_line())

    def eta(self) -> float | None:
        """Mean trial time (this run's trials) x remaining grid points / workers."""
        if not self.durations:
            return None
        return sum(self.durations) / len(self.durations) * max(0, self.total - self.done) / self.workers

    def status_line(self) -> str:
        elapsed = time.monotonic() - self.started
        best = f" | best {self.best}" if self.best else ""
        return (f"[sweep] {self.stage}: {self.done}/{self.total} trials | elapsed {clock(elapsed)} | "
                f"ETA {clock(self.eta())}{best}")

    def _render(self):
        from rich.text import Text

        lines = [self.status_line()]
        if self.current:
            lines.append(f"  {self.current}{': ' + self.epoch if self.epoch else ''}")
        return Text("\n".join(lines))

    def _plain(self, line: str) -> None:
        with self._lock:
            if self._live is not None:
                self._live.update(self._render())
            else:
                print(line, file=self.out, flush=True)

    def trial_started(self, label: str) -> None:
        """Shown live; as plain lines the worker has already announced the trial with its run directory."""
        self.current, self.epoch = label, ""
        if self._live is not None:
            self._live.update(self._render())

    def epoch_done(self, record: dict[str, Any]) -> None:
        """A line of the trial's progress file: its epoch and latest metrics."""
        self.epoch = f"epoch {record['epoch'] + 1}/{record.get('max_epochs') or '?'} {_metrics(record.get('metrics', {}))}"
        self._plain(f"[sweep] {self.stage} {self.current}: {self.epoch}")

    def trial_finished(self, seconds: float, done: int, best: str = "") -> None:
        """A trial ended after `seconds`; `done` grid points of the stage are now finished."""
        if seconds > 0:  # a reused result (identical config) costs nothing and says nothing about the ETA
            self.durations.append(seconds)
        self.done, self.current, self.epoch = done, "", ""
        self.best = best or self.best
        self._plain(self.status_line())

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None
