"""Load check of `cli.py serve`: requests/s and latency percentiles of POST /predict on CPU.

    python benchmarks/bench_serve.py [--run artifacts/sweeps/demo] [--clients 4] [--seconds 15]

Without --run it trains a small model on the embedded data first (about a minute).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


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
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    run = args.run
    if run is None:
        subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml"),
                        f"--run.root={tmp}", "--run.wandb=disabled", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"],
                       cwd=REPO, check=True, capture_output=True)
        run = str(next(Path(tmp).rglob("config.yaml")).parent)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", "--run", run, "--port", str(port)], cwd=REPO,
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
        image = (REPO / "artifacts" / "datasets" / "chd_phantom" / "VSD" / "VSD_000.png").read_bytes()
        print(f"model {info['name']} ({info['parameters']:,} parameters, input {info['input']['height']}px), "
              f"{args.clients} concurrent clients, {args.seconds:.0f} s each, CPU:")
        for heatmap in (False, True):
            rate, lat, errors = load(url, image, args.clients, args.seconds, heatmap)
            ms = np.array(lat) * 1000
            print(f"  /predict{'?heatmap=true' if heatmap else '             '}: {rate:7.1f} requests/s, "
                  f"p50 {np.percentile(ms, 50):6.1f} ms, p95 {np.percentile(ms, 95):6.1f} ms, {errors} errors")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
