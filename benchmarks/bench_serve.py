"""Load check of `cli.py serve`: requests/s and latency percentiles of POST /predict on CPU, then the server's
peak memory (from /proc, sampled every 5 ms: the server and its decode processes) under 16 parallel uploads of a
PNG just under the default `max_pixels`; with --hostile, the hostile set (issue 22): peak memory and the
worst-case latency of a normal request while scan-bomb JPEGs, huge-tile TIFFs, deflated and RLE DICOMs and
slow clients (slowloris headers, a body at 10 bytes/s) hit the server.

    python benchmarks/bench_serve.py [--run artifacts/sweeps/demo] [--clients 4] [--seconds 15] [--uploads 16]
    python benchmarks/bench_serve.py --hostile [--slow_clients 100]

Without --run it trains a small model on the embedded data first (about a minute).

    python benchmarks/bench_serve.py --compare_backends [--run ...] [--export DIR]

compares the torch server (on --run) with the ONNX Runtime server (on its `cli.py export`, made first unless
--export names one) side by side: cold start (process start to the first answer of /health), requests/s and
p95 latency of /predict, server RSS at idle and its peak under that load.

    python benchmarks/bench_serve.py --smoke     # tiny generated data, 1 epoch, 2 s of load, 1-MP uploads
"""

from __future__ import annotations

import argparse
import io
import os
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

from serving.limits import Limits, default_decode_slots  # noqa: E402  (after the repo is on the path)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def descendants(pid: int) -> list[int]:
    """The process's children, their children, ... (Linux /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


def tree_bytes(pid: int) -> int:
    """Memory of a process and all its descendants (the server's decode processes): the sum of their PSS
    (proportional set size), which counts each page shared by forked processes once, not once per process."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:  # a decode process that just ended
            continue
    return total


class PeakRss:
    """Samples a process's memory (RSS; `measure=tree_bytes`: with its decode processes) every 5 ms in a thread
    while in the `with` block; `.peak` is the highest seen."""

    def __init__(self, pid: int, measure=rss_bytes):
        self.pid, self.measure = pid, measure
        self.peak, self._stop = measure(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure(self.pid))
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
    idle = tree_bytes(pid)

    def upload(_):
        with httpx.Client(timeout=600) as c:
            return c.post(f"{url}/predict", files={"file": ("x.png", data, "image/png")}).status_code

    with PeakRss(pid, tree_bytes) as rss, ThreadPoolExecutor(uploads) as pool:
        statuses = list(pool.map(upload, range(uploads)))
    time.sleep(0.5)
    return idle, rss.peak, tree_bytes(pid), statuses


def hostile_uploads() -> dict[str, tuple[bytes, int]]:
    """The hostile set of issue 22: name -> (file, copies sent at once). About 20 s to generate."""
    from benchmarks import _hostile_uploads as hostile

    return {
        "progressive JPEG 6000^2, AC scan x10,000": (hostile.repeated_scan_jpeg(), 2),
        "TIFF 100x100 claiming one 32768^2 tile": (hostile.tiled_tiff(), 4),
        "deflated DICOM 128^2 + 1 GiB of zeros": (hostile.deflated_dicom(), 1),
        "RLE DICOM RGB 32-bit 5990x6000": (hostile.rle_dicom(), 1),
        "RLE DICOM grey 16-bit 5990x6000": (hostile.rle_dicom(6000, 5990, 1, 16), 1),
    }


def slow_clients(url: str, n: int, seconds: float) -> tuple[int, float, bytes]:
    """`n` connections sending their headers a byte a second, and one sending a body at 10 bytes/s, for at most
    `seconds`; (header connections the server closed, the last close in seconds, the slow body's answer)."""
    host, port = url.removeprefix("http://").split(":")
    conns = [socket.create_connection((host, int(port))) for _ in range(n)]
    body = socket.create_connection((host, int(port)))
    for c in conns:
        c.sendall(b"GET /health HTTP/1.1\r\n")
        c.setblocking(False)
    body.sendall(b"POST /predict HTTP/1.1\r\nHost: b\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 b"Content-Length: 1000000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"file\"; "
                 b"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n")
    body.setblocking(False)
    t0, closed, last, answer, open_ = time.perf_counter(), 0, 0.0, b"", set(range(n))
    while time.perf_counter() - t0 < seconds and (open_ or not answer):
        for k in list(open_):
            try:
                if conns[k].recv(1024) == b"":
                    raise ConnectionError
                conns[k].send(b"X")
            except BlockingIOError:
                conns[k].send(b"X")
            except OSError:
                open_.discard(k)
                closed, last = closed + 1, time.perf_counter() - t0
        try:
            answer += body.recv(4096)
        except BlockingIOError:
            body.send(b"a" * 10)
        except OSError:
            pass
        time.sleep(1)
    for c in [*conns, body]:
        c.close()
    return closed, last, answer.split(b"\r\n", 1)[0]


def hostile_set(url: str, pid: int, image: bytes, n_slow: int) -> None:
    """Peak memory of the server (with its decode processes) and the latency of a normal request, one every
    0.1 s, while the hostile set runs: every hostile upload in parallel, and the slow clients."""
    files = hostile_uploads()
    idle = tree_bytes(pid)
    latencies: list[float] = []
    errors, done = [0], threading.Event()

    def normal():
        with httpx.Client(timeout=120) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                errors[0] += c.post(f"{url}/predict", files={"file": ("x.png", image, "image/png")}).status_code != 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.1)

    def upload(name: str) -> tuple[str, int, float]:
        t0 = time.perf_counter()
        with httpx.Client(timeout=600) as c:
            r = c.post(f"{url}/predict", files={"file": ("x", files[name][0], "application/octet-stream")})
        return name, r.status_code, time.perf_counter() - t0

    names = [name for name, (_, copies) in files.items() for _ in range(copies)]
    with PeakRss(pid, tree_bytes) as mem, ThreadPoolExecutor(len(names) + 2) as pool:
        watcher = pool.submit(normal)
        slow = pool.submit(slow_clients, url, n_slow, 30)
        results = list(pool.map(upload, names))
        closed, last, answer = slow.result()
        done.set()
        watcher.result()
    mb, ms = 2**20, np.array(latencies) * 1000
    print(f"hostile set ({len(names)} uploads in parallel, {n_slow} slowloris connections, one body at 10 B/s):")
    for name, status, took in results:
        print(f"  {name:45s} {len(files[name][0]) / 1e6:6.2f} MB  -> {status} in {took:5.1f} s")
    print(f"  slowloris: {closed}/{n_slow} connections closed by the server, the last after {last:.1f} s; "
          f"slow body answered {answer.decode(errors='replace')!r}")
    print(f"  normal request during it: {len(ms)} sent, {errors[0]} errors, p50 {np.percentile(ms, 50):.0f} ms, "
          f"worst {ms.max():.0f} ms")
    print(f"  server + decode processes: idle {idle / mb:.0f} MB, peak {mem.peak / mb:.0f} MB "
          f"(+{(mem.peak - idle) / mb:.0f} MB)")


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


def start_server(run: str, port: int, extra: list[str] | None = None) -> tuple[subprocess.Popen, float]:
    """`cli.py serve` on `run`; returns the process and its cold start (seconds until /health answers)."""
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", "--run", run, "--port", str(port), *(extra or [])],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1500):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server on {run} exited with code {server.returncode}")
        time.sleep(0.05)
    server.terminate()
    raise SystemExit(f"the server on {run} did not start")


def measure_backend(run: str, image: bytes, clients: int, seconds: float) -> dict[str, float]:
    """Cold start, idle RSS, requests/s, p50/p95 latency and peak RSS under `clients` concurrent clients."""
    port = free_port()
    server, cold = start_server(run, port)
    url = f"http://127.0.0.1:{port}"
    try:
        httpx.post(f"{url}/predict", files={"file": ("x.png", image, "image/png")}, timeout=60)  # first-request set-up
        time.sleep(0.5)
        idle = rss_bytes(server.pid)
        with PeakRss(server.pid) as rss:
            rate, lat, errors = load(url, image, clients, seconds, heatmap=False)
        ms = np.array(lat) * 1000
        return {"cold_start_s": cold, "requests_s": rate, "p50_ms": float(np.percentile(ms, 50)),
                "p95_ms": float(np.percentile(ms, 95)), "rss_idle_mb": idle / 2**20, "rss_peak_mb": rss.peak / 2**20,
                "errors": errors}
    finally:
        server.terminate()
        server.wait()


def compare_backends(run: str, export_dir: str | None, clients: int, seconds: float) -> None:
    """The torch back end on `run` and the ONNX Runtime back end on its export, one after the other."""
    if export_dir is None:
        export_dir = str(Path(tempfile.mkdtemp()) / "export_onnx")
        subprocess.run([sys.executable, str(REPO / "cli.py"), "export", "--run", run, "--format", "onnx", "--out", export_dir],
                       cwd=REPO, check=True, capture_output=True)
    phantom = REPO / "artifacts" / "datasets" / "chd_phantom" / "VSD" / "VSD_000.png"
    image = phantom.read_bytes() if phantom.exists() else near_limit_png(128 * 128)
    rows = {"torch (sweep/run folder)": measure_backend(run, image, clients, seconds),
            "onnxruntime (export)": measure_backend(export_dir, image, clients, seconds)}
    print(f"{clients} concurrent clients, {seconds:.0f} s of POST /predict (no heat map), CPU, {os.cpu_count()} cores:")
    print(f"  {'back end':<26} {'cold start':>10} {'requests/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'RSS idle':>9} {'RSS load':>9} errors")
    for name, r in rows.items():
        print(f"  {name:<26} {r['cold_start_s']:>9.1f}s {r['requests_s']:>10.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['rss_idle_mb']:>7.0f}MB {r['rss_peak_mb']:>7.0f}MB {r['errors']:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--uploads", type=int, default=16, help="parallel near-limit uploads for the memory check")
    ap.add_argument("--decode_slots", type=int, default=None, help="the server's decode slots (default: its own)")
    ap.add_argument("--compare_backends", action="store_true", help="torch vs ONNX Runtime server, side by side")
    ap.add_argument("--export", default=None, help="the ONNX export of --run for --compare_backends (default: made now)")
    ap.add_argument("--hostile", action="store_true", help="run the hostile set (issue 22) instead of the load check")
    ap.add_argument("--slow_clients", type=int, default=100, help="slowloris connections in the hostile set")
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
    if args.compare_backends:
        compare_backends(run, args.export, args.clients, args.seconds)
        return
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
        if args.hostile:
            print(f"limits: {Limits(decode_slots=args.decode_slots or default_decode_slots())}; decode memory bound "
                  f"{Limits(decode_slots=args.decode_slots or default_decode_slots()).decode_memory_bound() / 2**20:.0f} MB")
            hostile_set(url, server.pid, image, args.slow_clients)
            return
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
