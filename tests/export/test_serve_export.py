"""`cli.py serve --run <export dir>`: ONNX Runtime behind the same page, API and limits, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fastapi.testclient import TestClient

from export import layout
from serving.app import Limits, create_app
from serving.cli import ServeConfig, build_app
from serving.onnx_backend import HEATMAP_UNAVAILABLE, OnnxPredictor
from tests.conftest import REPO
from tests.serving.conftest import encoded, png_bytes, post

LIMITS = Limits(max_bytes=200_000, max_pixels=1_000_000, decode_slots=2)


@pytest.fixture(scope="module")
def clients(trained, onnx_export):
    """(torch server on the run, ONNX server on its export), with the same limits."""
    from serving.model import Predictor, locate

    torch_app = create_app(Predictor(locate(trained.run_dir), "cpu", "gradcam"), LIMITS)
    return TestClient(torch_app), TestClient(create_app(OnnxPredictor(onnx_export), LIMITS))


def uploads(phantoms):
    """Phantom PNGs as trained on, a grayscale and an RGB noise image of other sizes, a JPEG big enough to be
    reduced while decoding."""
    out = [p.read_bytes() for p in sorted(phantoms.rglob("*.png"))[:4]]
    yy, xx = np.mgrid[0:700, 0:500]
    big = np.stack([(xx * 255 // 500), (yy * 255 // 700), ((xx + yy) % 256)], axis=2).astype(np.uint8)  # smooth: a small JPEG
    return [*out, png_bytes((90, 40), mode="L"), png_bytes((33, 77), seed=5), encoded(big, "JPEG", quality=90)]


def test_export_answers_the_probabilities_of_the_run(clients, trained):
    torch_client, onnx_client = clients
    for data in uploads(trained.phantoms):
        a, b = post(torch_client, data).json(), post(onnx_client, data).json()
        assert "class" in a and "class" in b, (a, b)
        assert a["class"] == b["class"] and a["class_index"] == b["class_index"]
        assert a["probabilities"].keys() == b["probabilities"].keys()
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) <= 1e-4
        assert a["model"] == b["model"]


def test_same_limits_and_errors(clients):
    for client in clients:
        assert post(client, b"").status_code == 400
        assert post(client, b"GIF89a" + b"\0" * 100).status_code == 415
        assert post(client, png_bytes((1100, 1000), constant=7)).status_code == 413  # over max_pixels
        assert post(client, b"\0" * 250_000).status_code == 413  # over max_bytes
        assert post(client, png_bytes()[:60]).status_code in (415, 422)
        assert client.get("/health").json()["status"] == "ok"


def test_same_description_and_page_saying_no_heat_map(clients, onnx_export):
    torch_client, onnx_client = clients
    a, b = torch_client.get("/model").json(), onnx_client.get("/model").json()
    for key in ("name", "network", "classes", "positive_class", "input", "loss", "parameters", "test_metrics"):
        assert a[key] == b[key], key
    assert b["backend"] == "onnxruntime" and b["heatmap_unavailable"] == HEATMAP_UNAVAILABLE
    assert b["sha256"] == json.loads((onnx_export / layout.EXPORT).read_text())["sha256"]
    answer = post(onnx_client, png_bytes(), heatmap="true").json()
    assert answer["heatmap_png"] is None and answer["heatmap_error"] == HEATMAP_UNAVAILABLE
    page = onnx_client.get("/").text
    assert "info.heatmap_unavailable" in page and "data.heatmap_error" in page
    assert onnx_client.get("/openapi.json").json()["paths"].keys() == torch_client.get("/openapi.json").json()["paths"].keys()


def test_a_changed_export_is_refused(onnx_export, tmp_path):
    import shutil

    copy = shutil.copytree(onnx_export, tmp_path / "copy")
    with (copy / layout.ONNX).open("ab") as f:
        f.write(b"\0")
    from errors import ConfigError

    with pytest.raises(ConfigError, match="sha256 differs"):
        build_app(ServeConfig(run=str(copy)))


def test_onnx_server_imports_neither_torch_nor_lightning(onnx_export):
    """`cli.py serve`'s own path (cli.main's imports, build_app) in a fresh interpreter, then one prediction."""
    code = textwrap.dedent(f"""
        import sys
        import cli
        from datamodules.images import allow_large_scans
        from runs import config_names
        from serving.cli import ServeConfig, build_app
        from fastapi.testclient import TestClient
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (90, 60, 30)).save(buf, format="PNG")
        app = build_app(ServeConfig(run={str(onnx_export)!r}))
        r = TestClient(app).post("/predict", files={{"file": ("x.png", buf.getvalue(), "image/png")}})
        assert r.status_code == 200, r.text
        heavy = sorted(m for m in ("torch", "lightning", "lightning.pytorch", "timm", "torchvision", "torchmetrics") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout
