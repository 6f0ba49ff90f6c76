"""`cli.py serve`: the JSON API with every kind of bad input, concurrency, an OpenAPI fuzz, and the page."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from serving.app import Limits, create_app
from serving.model import Predictor, locate
from tests.conftest import run_cli, small_fit_args

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_bytes(size=(80, 60), mode="RGB", seed=0, constant: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    if constant is not None:  # compresses to a few kB whatever the pixel count
        arr[:] = constant
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    proc = run_cli("fit", *small_fit_args(tmp / "a", tmp / "runs", "--model.network={name: ctnet10, pool: null, hidden: null, dropout: null}",
                                          "--report.bootstrap=50", epochs=2))
    assert proc.returncode == 0, proc.stdout[-3000:]
    run_dir = next((tmp / "runs").rglob("config.yaml")).parent
    proc = run_cli("test", "--config", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor(locate(trained_run), "cpu", "gradcam")


@pytest.fixture(scope="module")
def client(predictor):
    return TestClient(create_app(predictor, Limits(max_bytes=200_000, max_pixels=1_000_000)))


def phantom(run_dir, name: str):
    """A phantom image file of the run's dataset, e.g. phantom(run, "VSD/VSD_000.png")."""
    artifacts = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["artifacts_dir"]
    return Path(artifacts) / "datasets" / "chd_phantom" / name


def post(client, data: bytes, ctype="image/png", name="x.png", **params):
    return client.post("/predict", files={"file": (name, data, ctype)}, params=params)


def test_health_and_model_description(client, trained_run):
    assert client.get("/health").json() == {"status": "ok", "model": "ctnet10"}
    info = client.get("/model").json()
    assert info["classes"] == ["normal", "ASD", "VSD", "PDA"] and info["input"]["height"] == 32
    assert set(info["test_metrics"]["metrics"]) >= {"acc", "sensitivity", "specificity", "auroc"}
    m = info["test_metrics"]["metrics"]["acc"]
    assert m["low"] <= m["value"] <= m["high"]


def test_predict_returns_probabilities_and_a_heatmap(client, trained_run):
    image = phantom(trained_run, "VSD/VSD_000.png").read_bytes()
    r = post(client, image, heatmap="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class"] in body["probabilities"] and abs(sum(body["probabilities"].values()) - 1) < 1e-5
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert overlay.size == (32, 32)
    assert post(client, image).json()["heatmap_png"] is None


@pytest.mark.parametrize("mode, fmt, ctype", [("L", "PNG", "image/png"), ("RGB", "JPEG", "image/jpeg"),
                                              ("RGB", "BMP", "image/bmp"), ("RGB", "TIFF", "image/tiff")])
def test_formats_like_training(client, mode, fmt, ctype):
    buf = io.BytesIO()
    Image.fromarray(np.full((50, 40, 1 if mode == "L" else 3), 90, np.uint8).squeeze()).save(buf, format=fmt)
    assert post(client, buf.getvalue(), ctype).status_code == 200


@pytest.mark.parametrize("data, ctype, status, message", [
    (b"", "image/png", 400, "empty"),
    (b"hello, I am text", "image/png", 415, "not an image"),
    (png_bytes(), "text/plain", 415, "unsupported content type"),
    (png_bytes(), "image/gif", 415, "unsupported content type"),
    (png_bytes()[:300], "image/png", 422, "could not be decoded"),
    (png_bytes((1200, 1000), constant=7), "image/png", 413, "pixels, over the limit"),
    (b"\x89PNG" + bytes(300_000), "image/png", 413, "larger than the limit"),
])
def test_bad_input_is_a_4xx_with_a_message(client, data, ctype, status, message):
    r = post(client, data, ctype)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get("/health").status_code == 200  # still serving


def test_missing_file_and_hostile_file_names(client):
    assert client.post("/predict").status_code == 422
    assert client.post("/predict", data={"file": "not a file"}).status_code == 422
    r = post(client, png_bytes(), name="../../../etc/passwd")
    assert r.status_code == 200 and "passwd" not in r.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(predictor):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_concurrent_requests_are_safe(live_server):
    images = [png_bytes(seed=s) for s in range(4)]
    with httpx.Client() as c:
        expected = [c.post(f"{live_server}/predict", files={"file": ("x.png", im, "image/png")}).json()["probabilities"] for im in images]

    def one(i):
        with httpx.Client(timeout=60) as c:
            r = c.post(f"{live_server}/predict?heatmap=true", files={"file": ("x.png", images[i % 4], "image/png")})
            return i, r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    for i, status, body in results:
        assert status == 200
        assert body["heatmap_png"]
        for c, p in expected[i % 4].items():
            assert abs(body["probabilities"][c] - p) < 1e-5  # no request saw another's hooks or state


def test_openapi_fuzz_finds_no_server_error(live_server, tmp_path):
    """Schemathesis generates requests from the server's OpenAPI schema (valid and invalid ones); no
    response may be a 5xx. Run through schemathesis' own CLI, as a user would."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{live_server}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "60", "--seed", "1", "--phases", "examples,coverage,fuzzing", "--report", "junit",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    print(proc.stdout[-2500:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    junit = next(tmp_path.rglob("*.xml")).read_text()
    assert "/predict" in junit and "/model" in junit  # every operation was exercised


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_in_headless_chromium(live_server, trained_run, tmp_path):
    from playwright.sync_api import sync_playwright

    image = phantom(trained_run, "PDA/PDA_003.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(live_server + "/")
        page.wait_for_function("document.getElementById('model-name').textContent.includes('ctnet10')")
        assert "Research tool" in page.inner_text(".notice")
        assert page.locator("#metrics table tr").count() >= 9  # header + 8 metrics with intervals
        page.set_input_files("#file", str(image))
        page.wait_for_function("document.getElementById('prediction').textContent.startsWith('Predicted:')")
        page.wait_for_function("(() => { const i = document.getElementById('overlay'); return i.complete && i.naturalWidth > 0; })()")
        assert page.locator("#bars .bar").count() == 4
        assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
        page.screenshot(path=str(tmp_path / "page.png"))
        page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert "not an image" in page.inner_text("#error")
        browser.close()
