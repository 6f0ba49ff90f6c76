"""Peak memory and wall time of decoding files, measured in a fresh process (run by the tests as
`python -m tests.datamodules.measure PATH...`; prints one JSON line per file).

The peak is VmHWM from /proc/self/status, reset before each file by writing 5 to /proc/self/clear_refs
(Linux), so each file's growth over the resident size before it is its own. Time is reported as wall
seconds and as the process's CPU seconds (all threads), which the tests assert on: a machine shared with other
jobs stretches the first, not the second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(path: str, how: str) -> dict:
    from datamodules.images import ImageDecodeError, decode, decode_within_time
    from serving.images import decode_upload

    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        if how == "server":
            decode_upload(data, 3, (224, 224), "squash", 36_000_000)
        elif how == "timed":
            decode_within_time(data, 1, seconds=float(sys.argv[2]))
        else:
            decode(data, 1)
        outcome, reason = "decoded", ""
    except ImageDecodeError as e:
        outcome, reason = type(e).__name__, str(e)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"path": path, "outcome": outcome, "reason": reason, "seconds": round(seconds, 3), "cpu": round(cpu, 3),
            "peak_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}


def measure(paths: list[Path], how: str = "data", timeout: float = 120, time_limit: float = 30.0) -> list[dict]:
    """Decode each file in one fresh process ("data": `decode`, "timed": `decode_within_time`, "server":
    `decode_upload` at the server's defaults); returns one record per file."""
    import pytest

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is measured from /proc (Linux)")
    out = subprocess.run([sys.executable, "-m", "tests.datamodules.measure", how, str(time_limit), *map(str, paths)],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"measuring process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # pydicom's warnings about the hostile files' values
    sys.path.insert(0, str(REPO))
    for p in sys.argv[3:]:
        print(json.dumps(_measure(p, sys.argv[1])), flush=True)
