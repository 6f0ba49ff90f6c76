"""What one request may cost the server, enforced on what decoders really do (issue 22): each decode in its
own process with a memory budget and a time limit, fair decode slots, slow clients cut off, no upload echoed
back, nothing loaded from other hosts. Hostile files are generated in the test (benchmarks._hostile_uploads)."""

from __future__ import annotations

import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import cache

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks import _hostile_uploads as hostile
from datamodules.images import ImageDecodeError
from serving import sandbox
from serving.app import create_app
from serving.limits import Limits, header_timeout_protocol
from tests.datamodules.test_dicom import dicom_bytes
from tests.serving import standins
from tests.serving.conftest import png_bytes, post, serve_in_thread

TIGHT = Limits(max_bytes=8_000_000, max_pixels=1_000_000, decode_slots=2, decode_seconds=5.0)
TIMED = Limits(max_bytes=2_000_000, max_pixels=36_000_000, decode_slots=2, decode_seconds=1.0, read_timeout=1.0)


@cache
def hostile_file(name: str) -> bytes:
    """Each hostile file generated once (under a second each), sized to pass the TIGHT limits' header checks."""
    return {
        "tiff_tile": lambda: hostile.tiled_tiff(100, 100, 32768, 2**20),
        "deflated_dicom": lambda: hostile.deflated_dicom(128, 2**28),
        "rle_dicom": lambda: hostile.rle_dicom(1000, 1000, 3, 32),
        "scan_jpeg": lambda: hostile.repeated_scan_jpeg(2048, 20_000),
    }[name]()


def test_a_decode_past_its_time_limit_is_killed():
    t0 = time.perf_counter()
    with pytest.raises(sandbox.OverBudget, match="longer than the limit of 0.5 s"):
        sandbox.run(time.sleep, (60,), 0.5, 2**26)
    assert time.perf_counter() - t0 < 3


def test_an_allocation_past_the_budget_fails_inside_the_decode_process():
    with pytest.raises(sandbox.OverBudget, match="memory budget of 64 MiB"):
        sandbox.run(bytearray, (2**30,), 30, 2**26)
    assert len(sandbox.run(bytearray, (2**20,), 30, 2**26)) == 2**20  # within the budget


def test_a_crashing_decoder_is_a_decode_error_not_a_dead_server():
    with pytest.raises(ImageDecodeError, match="crashed"):
        sandbox.run(os.abort, (), 30, 2**26)


@pytest.fixture(scope="module")
def tight(predictor) -> TestClient:
    return TestClient(create_app(predictor, TIGHT))


@pytest.mark.parametrize("name", ["tiff_tile", "deflated_dicom", "rle_dicom"])
def test_memory_bombs_are_refused_or_decoded_within_budget(tight, name):
    """A TIFF claiming one 32768² tile, a DICOM inflating 256 MiB of padding, an RLE DICOM of 32-bit RGB:
    each is answered (413 past its budget, or decoded inside it), never a 5xx, within the time limit."""
    t0 = time.perf_counter()
    r = post(tight, hostile_file(name), "application/octet-stream", "x.bin")
    assert r.status_code in {"tiff_tile": (413,), "deflated_dicom": (413,), "rle_dicom": (200, 413)}[name], r.text
    assert time.perf_counter() - t0 < TIGHT.decode_seconds + 2
    if r.status_code == 413:  # refused from its header by the decoder's own checks, or by the process's budget
        assert re.search(r"memory budget|over the (pixel |byte |decode )?(limit|budget)|more than", r.json()["detail"]), r.text


def test_more_than_one_file_part_is_400(tight):
    r = tight.post("/predict", files=[("file", ("a.png", png_bytes(), "image/png")),
                                      ("file", ("b.png", png_bytes(seed=1), "image/png"))])
    assert r.status_code == 400 and "2 `file` parts" in r.json()["detail"], r.text


def test_a_422_never_echoes_the_upload(tight):
    """A part named only by `filename*=` is a text field to Starlette; FastAPI's 422 would repeat its bytes."""
    secret = b"PATIENT-NAME-SECRET-" * 20
    body = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''a.png\r\n"
            b"Content-Type: image/png\r\n\r\n" + secret + b"\r\n--x--\r\n")
    r = tight.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 422, r.text
    assert b"SECRET" not in r.content and r.json()["detail"][0]["loc"] == ["body", "file"]


def test_served_pages_load_nothing_from_other_hosts(tight):
    """ReDoc's bundle draws its footer logo from cdn.redoc.ly: the server sends it without that code."""
    for page in ("/", "/docs", "/redoc"):
        html = tight.get(page).text
        assert "src=\"http" not in html and "href=\"http" not in html, page
    bundle = tight.get("/static-offline-docs/redoc.standalone.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert b"cdn.redoc.ly" not in bundle.content and b"https://redocly.com/redoc/" not in bundle.content
    assert "validatorUrl" in tight.get("/docs").text


@contextmanager
def live(predictor, limits: Limits):
    """The app with `limits` on a real uvicorn server in a thread, with the header timeout `cli.py serve` uses."""
    with serve_in_thread(create_app(predictor, limits), http=header_timeout_protocol(limits.read_timeout)) as url:
        assert httpx.post(f"{url}/predict", files={"file": ("x.png", png_bytes(), "image/png")}).status_code == 200
        yield url


@pytest.fixture(scope="module")
def timed(predictor):
    """1 s decode limit, 1 s read timeout."""
    with live(predictor, TIMED) as url:
        yield url


def timed_post(url: str, data: bytes) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/predict", files={"file": ("x", data, "application/octet-stream")}, timeout=60)
    return r.status_code, time.perf_counter() - t0, r.text


def test_a_small_png_is_answered_promptly_while_two_hostile_decodes_run(predictor, monkeypatch):
    """Two JPEGs whose decode never ends (a stand-in decoder) hold both decode slots until the 4 s limit stops
    them (413); a small PNG sent meanwhile is decoded in the express slot and answered at once."""
    monkeypatch.setattr("serving.app.decode_upload", standins.endless_jpeg_decode)
    with live(predictor, replace(TIMED, decode_seconds=4.0)) as url, ThreadPoolExecutor(2) as pool:
        bombs = [pool.submit(timed_post, url, hostile_file("scan_jpeg")) for _ in range(2)]
        time.sleep(0.5)
        status, seconds, text = timed_post(url, png_bytes())
        results = [b.result() for b in bombs]
    assert status == 200, text
    assert seconds < 2, seconds
    for code, took, body in results:
        assert code == 413 and "longer than the limit of 4 s" in body, body
        assert took < 4 + 2 + 2, took  # the express try (2 s at most), then the regular slot's limit


def test_a_dicom_waiting_for_the_dicom_decoder_holds_no_slot(predictor, monkeypatch):
    """Two DICOMs that each take 2 s to decode (a stand-in decoder): the second waits for the first without a
    decode slot, so a PNG sent meanwhile takes the free slot at once."""
    monkeypatch.setattr("serving.app.decode_upload", standins.slow_dicom_decode)
    dicom = dicom_bytes(np.full((64, 64), 300, np.uint16))
    with live(predictor, replace(TIMED, decode_seconds=30.0, express_pixels=0)) as url, ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(timed_post, url, dicom) for _ in range(2)]
        time.sleep(0.3)
        status, seconds, text = timed_post(url, png_bytes())
        results = [s.result() for s in slow]
    assert status == 200 and seconds < 1.2, (status, seconds, text)  # the slot is taken at once
    assert [code for code, _, _ in results] == [200, 200]
    assert max(took for _, took, _ in results) > 2 * standins.DICOM_SECONDS  # one after the other


def closed_after(sock: socket.socket, trickle: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send `trickle` a byte every `every` s until the server closes the connection; (seconds, its answer)."""
    t0, answer = time.perf_counter(), b""
    sock.setblocking(False)
    while time.perf_counter() - t0 < limit:
        try:
            part = sock.recv(4096)
            if not part:
                return time.perf_counter() - t0, answer
            answer += part
        except BlockingIOError:
            pass
        except OSError:
            return time.perf_counter() - t0, answer
        try:
            sock.send(trickle[:1] or b"x")
            trickle = trickle[1:]
        except OSError:
            return time.perf_counter() - t0, answer
        time.sleep(every)
    return float("inf"), answer


def test_a_slowloris_client_is_cut_off(timed):
    """Headers sent a byte every 0.1 s: the server closes the connection after its 1 s read timeout."""
    host, port = timed.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        seconds, _ = closed_after(sock, b"X-Slow: " + b"a" * 200, 0.1, 10)
    assert seconds < TIMED.read_timeout + 1.5, seconds


def test_a_body_trickling_in_is_408_and_cut_off(timed):
    """A body at 10 bytes per second: 408 and the connection closed shortly after the read timeout."""
    host, port = timed.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        seconds, answer = closed_after(sock, b"--x\r\n" + b"a" * 1000, 0.1, 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"too slowly" in answer
    assert seconds < TIMED.read_timeout + 1.5, seconds
