"""`cli.py serve`: the JSON API with every kind of bad input, preprocessing as in training; slow: concurrency on a
live server, an OpenAPI fuzz, the page and the docs in headless Chromium (offline)."""

from __future__ import annotations

import base64
import io
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from datamodules.images import decode, resize
from serving.app import create_app
from tests.serving.conftest import encoded, png_bytes, post, serve_in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_health_and_model_description(client):
    assert client.get("/health").json() == {"status": "ok", "model": "resnet10t"}
    info = client.get("/model").json()
    assert info["classes"] == ["normal", "ASD", "VSD", "PDA"] and info["input"]["height"] == 32
    assert info["input"]["resize"] == "letterbox"  # from the checkpoint, not config.yaml
    assert set(info["test_metrics"]["metrics"]) >= {"acc", "sensitivity", "specificity", "auroc"}
    m = info["test_metrics"]["metrics"]["acc"]
    assert m["low"] <= m["value"] <= m["high"]


def test_predict_returns_probabilities_and_a_heatmap(client, served):
    image = (served.phantoms / "VSD" / "VSD_000.png").read_bytes()
    r = post(client, image, heatmap="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["class"] in body["probabilities"] and abs(sum(body["probabilities"].values()) - 1) < 1e-5
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert overlay.size == (32, 32)
    assert post(client, image).json()["heatmap_png"] is None


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF"),
                                       ("I;16", "PNG")])
def test_formats_like_training(client, predictor, mode, fmt):
    """Every accepted format gives the probabilities of the training path's preprocessing (the decode cache:
    `resize(decode(...))` with the model's channels, size and resize mode)."""
    rng = np.random.default_rng(3)
    if mode == "I;16":  # a 12-bit export: training windows it by its own min-max
        arr = rng.integers(200, 4000, (50, 70), dtype=np.uint16)
    else:
        arr = rng.integers(0, 255, (50, 70) if mode == "L" else (50, 70, 3), dtype=np.uint8)
    data = encoded(arr, fmt)
    r = post(client, data, "application/octet-stream")
    assert r.status_code == 200, r.text
    training = resize(decode(data, predictor.channels), predictor.image_size, "letterbox")
    expected = predictor.predict(training, False)["probabilities"]
    for c, p in expected.items():
        assert abs(r.json()["probabilities"][c] - p) < 1e-6, (c, r.json()["probabilities"], expected)
    squashed = predictor.predict(resize(decode(data, predictor.channels), predictor.image_size, "squash"), False)
    assert max(abs(squashed["probabilities"][c] - p) for c, p in expected.items()) > 1e-6  # the check can fail


@pytest.mark.parametrize("data, ctype, status, message", [
    (b"", "image/png", 400, "empty"),
    (b"hello, I am text", "image/png", 415, "not an image"),
    (encoded(np.zeros((20, 20, 3), np.uint8), "GIF"), "image/png", 415, "PNG, JPEG, BMP, TIFF or DICOM"),
    (png_bytes()[:300], "image/png", 422, "could not be decoded"),
    (png_bytes((1200, 1000), constant=7), "image/png", 413, "pixels, over the limit"),
    (b"\x89PNG" + bytes(300_000), "image/png", 413, "larger than the limit"),
], ids=["empty", "text", "gif", "truncated", "pixels", "bytes"])
def test_bad_input_is_a_4xx_with_a_message(client, data, ctype, status, message):
    r = post(client, data, ctype)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get("/health").status_code == 200  # still serving


def test_the_content_decides_not_the_label(client):
    assert post(client, png_bytes(), "text/plain").status_code == 200
    assert post(client, png_bytes(), "image/gif").status_code == 200


def test_missing_file_and_hostile_file_names(client):
    assert client.post("/predict").status_code == 422
    assert client.post("/predict", data={"file": "not a file"}).status_code == 422
    r = post(client, png_bytes(), name="../../../etc/passwd")
    assert r.status_code == 200 and "passwd" not in r.text


@pytest.fixture(scope="module")
def live_server(predictor):
    """The app on a real uvicorn server in a thread of this process."""
    with serve_in_thread(create_app(predictor)) as url:
        yield url


@pytest.mark.slow
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


@pytest.mark.slow
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


def offline_chromium(playwright, live_server):
    """Headless Chromium that can reach nothing but the test server (as on a machine without internet)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"])
    context = browser.new_context()
    blocked: list[str] = []

    def only_local(route):
        if route.request.url.startswith(live_server):
            return route.continue_()
        blocked.append((route.request.resource_type, route.request.url))
        return route.abort()

    context.route("**/*", only_local)
    return browser, context, blocked


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_in_headless_chromium(live_server, served, tmp_path):
    from playwright.sync_api import sync_playwright

    image = served.phantoms / "PDA" / "PDA_003.png"
    with sync_playwright() as p:
        browser, context, blocked = offline_chromium(p, live_server)
        page = context.new_page()
        page.goto(live_server + "/")
        page.wait_for_function("document.getElementById('model-name').textContent.includes('resnet10t')")
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
    assert blocked == []


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_docs_render_offline_in_headless_chromium(live_server):
    """/docs (Swagger UI) and /redoc draw the API from locally served scripts with every other host blocked."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, context, blocked = offline_chromium(p, live_server)
        page = context.new_page()
        page.goto(live_server + "/docs")
        page.wait_for_selector("#swagger-ui .opblock", timeout=20_000)
        assert "/predict" in page.inner_text("#swagger-ui")
        page.goto(live_server + "/redoc")
        page.wait_for_function("document.body.innerText.includes('/predict')", timeout=20_000)
        browser.close()
    # ReDoc's "powered by" footer links a logo image on its CDN; nothing the page needs is fetched from outside.
    assert [b for b in blocked if b[0] != "image"] == [], blocked
