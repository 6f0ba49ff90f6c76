"""Load check of `cli.py serve`: requests/s and latency percentiles of POST /predict on CPU, then the server's
peak memory (VmRSS from /proc, sampled every 5 ms) under 16 parallel uploads of a PNG just under the default
`max_pixels`.

    python benchmarks/bench_serve.py [--run artifacts/sweeps/demo] [--clients 4] [--seconds 15] [--uploads 16]

Without --run it trains a small model on the embedded data first (about a minute).

    python benchmarks/bench_serve.py --smoke     # tiny generated data, 1 epoch, 2 s of load, 1-MP uploads
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.limits import Limits  # noqa: E402  (after the repo is on the path)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's RSS every 5 ms in a thread while in the `with` block; `.peak` is the highest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_bytes(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def near_limit_png(max_pixels: int) -> bytes:
    """An RGB PNG just under max_pixels (5939 x 5939 for the default): about 100 MB of pixels in ~100 kB."""
    side = int((max_pixels * 0.98) ** 0.5)
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


def memory_under_uploads(url: str, pid: int, uploads: int, max_pixels: int) -> tuple[int, int, int, list[int]]:
    """(idle RSS, peak RSS, RSS afterwards, statuses) for `uploads` parallel near-limit uploads."""
    data = near_limit_png(max_pixels)
    idle = rss_bytes(pid)

    def upload(_):
        with httpx.Client(timeout=600) as c:
            return c.post(f"{url}/predict", files={"file": ("x.png", data, "image/png")}).status_code

    with PeakRss(pid) as rss, ThreadPoolExecutor(uploads) as pool:
        statuses = list(pool.map(upload, range(uploads)))
    time.sleep(0.5)
    return idle, rss.peak, rss_bytes(pid), statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, image: bytes, clients: int, seconds: float, heatmap: bool) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds

    def client():
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.post(f"{url}/predict", params={"heatmap": str(heatmap).lower()},
                           files={"file": ("x.png", image, "image/png")})
                latencies.append(time.perf_counter() - t0)
                errors[0] += r.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - t0), latencies, errors[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--uploads", type=int, default=16, help="parallel near-limit uploads for the memory check")
    ap.add_argument("--decode_slots", type=int, default=None, help="the server's decode slots (default: its own)")
    ap.add_argument("--max_pixels", type=int, default=Limits().max_pixels, help="the server's max_pixels")
    ap.add_argument("--smoke", action="store_true", help="tiny generated data, 1 epoch, 2 clients for 2 s, 2 uploads "
                                                         "under a 1-MP limit: checks the code path")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    run, data, phantom = args.run, [], REPO / "artifacts" / "datasets" / "chd_phantom" / "VSD" / "VSD_000.png"
    if args.smoke:
        from benchmarks._smoke import CLASSES, tiny_folder

        folder = tiny_folder(Path(tmp) / "data")
        data = [f"--data.source={folder}", f"--data.classes=[{','.join(CLASSES)}]", "--data.num_workers=0",
                f"--data.artifacts_dir={tmp}/artifacts", "--trainer.max_epochs=1", "--report.bootstrap=50"]
        args.clients, args.seconds, args.uploads, args.max_pixels = 2, 2.0, 2, 1_000_000
        phantom = Path(folder) / CLASSES[0] / "000.png"
    if run is None:
        subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml"),
                        f"--run.root={tmp}", "--run.wandb=disabled", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
                        *data], cwd=REPO, check=True, capture_output=True)
        run = str(next(Path(tmp).rglob("config.yaml")).parent)
    port = free_port()
    slots = [f"--decode_slots={args.decode_slots}"] if args.decode_slots else []
    server = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", "--run", run, "--port", str(port), *slots,
                               f"--max_pixels={args.max_pixels}"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                info = httpx.get(f"{url}/model", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        image = phantom.read_bytes() if phantom.exists() else near_limit_png(128 * 128)  # 126 x 126 when absent
        print(f"model {info['name']} ({info['parameters']:,} parameters, input {info['input']['height']}px), "
              f"{args.clients} concurrent clients, {args.seconds:.0f} s each, CPU:")
        for heatmap in (False, True):
            rate, lat, errors = load(url, image, args.clients, args.seconds, heatmap)
            ms = np.array(lat) * 1000
            print(f"  /predict{'?heatmap=true' if heatmap else '             '}: {rate:7.1f} requests/s, "
                  f"p50 {np.percentile(ms, 50):6.1f} ms, p95 {np.percentile(ms, 95):6.1f} ms, {errors} errors")
        if args.uploads:
            t0 = time.perf_counter()
            idle, peak, after, statuses = memory_under_uploads(url, server.pid, args.uploads, args.max_pixels)
            mb = 2**20
            print(f"  {args.uploads} parallel uploads just under max_pixels={args.max_pixels:,} "
                  f"({time.perf_counter() - t0:.1f} s, {sum(s != 200 for s in statuses)} errors): server RSS idle "
                  f"{idle / mb:.0f} MB, peak {peak / mb:.0f} MB (+{(peak - idle) / mb:.0f} MB), afterwards {after / mb:.0f} MB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
