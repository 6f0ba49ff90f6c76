"""`cli.py serve` as a real process on 127.0.0.1 (slow): its memory (with its decode processes) under parallel
near-limit uploads and under the hostile set of issue 22, read from /proc, and a 1 GB chunked upload cut off
at the limit on the wire."""

from __future__ import annotations

import io
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from benchmarks import _hostile_uploads as hostile
from benchmarks.bench_serve import PeakRss, near_limit_png, tree_bytes
from serving.limits import Limits
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")]

MAX_BYTES = 16_000_000  # large against the loopback socket buffers (a few MB) that the count includes
DECODE_SECONDS = 60  # a 36-MP PNG takes 2 s to decode on an idle core, 10 on the shared test machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """`python cli.py serve --run <run dir>` started from another working directory, default limits except
    max_bytes; yields (url, pid)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "serve", "--run", str(served.run_dir), "--port", str(port),
                             f"--max_bytes={MAX_BYTES}", f"--decode_seconds={DECODE_SECONDS}"], cwd=tmp_path_factory.mktemp("elsewhere"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.HTTPError:
            assert proc.poll() is None, "the server exited"
            time.sleep(0.1)
    yield url, proc.pid
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit code 0
    assert proc.wait(timeout=30) == 0


def test_parallel_near_limit_uploads_keep_memory_bounded(server):
    """8 uploads of just under the default max_pixels at once: the server's memory with its decode processes
    stays under idle + 1.5 GB (decode slots, decode-time reduction), and goes back afterwards."""
    url, pid = server
    data = near_limit_png(Limits().max_pixels)
    with httpx.Client() as c:  # one request first, so lazy start-up allocations count as idle
        assert c.post(f"{url}/predict", files={"file": ("x.png", png_small(), "image/png")}).status_code == 200
    idle = tree_bytes(pid)

    def upload(_):
        with httpx.Client(timeout=300) as c:
            return c.post(f"{url}/predict", files={"file": ("x.png", data, "image/png")}).status_code

    with PeakRss(pid, tree_bytes) as rss, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(upload, range(8)))
    assert statuses == [200] * 8
    print(f"idle {idle / 2**20:.0f} MB, peak {rss.peak / 2**20:.0f} MB (+{(rss.peak - idle) / 2**20:.0f} MB)")
    assert rss.peak - idle < 1.5 * 2**30
    time.sleep(0.5)
    assert tree_bytes(pid) - idle < 0.5 * 2**30  # freed image buffers went back to the OS


def test_hostile_uploads_stay_under_the_decode_memory_bound(server):
    """Issue 22's memory bombs all at once (a 1 GiB deflated DICOM, 4 huge-tile TIFFs, an RLE RGB 32-bit DICOM
    of 36 MP): every one answered without a 5xx, and the server with its decode processes never grows by more
    than `Limits.decode_memory_bound()` (each decode process is capped at its budget)."""
    url, pid = server
    files = [hostile.deflated_dicom(), *[hostile.tiled_tiff()] * 4, hostile.rle_dicom()]
    idle = tree_bytes(pid)

    def upload(data):
        with httpx.Client(timeout=300) as c:
            return c.post(f"{url}/predict", files={"file": ("x", data, "application/octet-stream")}).status_code

    with PeakRss(pid, tree_bytes) as mem, ThreadPoolExecutor(len(files)) as pool:
        statuses = list(pool.map(upload, files))
    bound = Limits(max_bytes=MAX_BYTES).decode_memory_bound()
    print(f"statuses {statuses}; idle {idle / 2**20:.0f} MB, peak +{(mem.peak - idle) / 2**20:.0f} MB (bound {bound / 2**20:.0f} MB)")
    assert all(s in (200, 413, 422) for s in statuses), statuses
    assert statuses[:5] == [413] * 5
    assert mem.peak - idle < bound


def png_small() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_chunked_1gb_upload_is_413_before_twice_the_limit_is_sent(server):
    """A 1 GB chunked body (no Content-Length), generated lazily over a raw socket: the server answers 413 and
    closes the connection while the client has sent less than 2 x max_bytes."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    sent, total, block = 0, 2**30, chunk(b"\0" * 65536)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
        sock.sendall(chunk(b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                           b"Content-Type: image/png\r\n\r\n"))
        while sent < total and not select.select([sock], [], [], 0)[0]:  # stop once the server has answered
            try:
                sock.sendall(block)
            except OSError:  # the server closed the connection
                break
            sent += len(block)
        response = b""
        while not response.endswith(b"}"):  # the JSON body may come in a second segment
            try:
                part = sock.recv(4096)
            except OSError:
                break
            if not part:
                break
            response += part
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert f"limit of {MAX_BYTES} bytes".encode() in response
    print(f"sent {sent:,} bytes of a 1 GB body before the 413 (limit {MAX_BYTES:,})")
    assert sent < 2 * MAX_BYTES, sent
