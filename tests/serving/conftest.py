"""One tiny letterbox model for every serving test, trained in this process (a few seconds), and helpers."""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from runs import files
from serving.app import Limits, create_app
from serving.model import Predictor, locate
from tests.conftest import small_fit_args


@dataclass
class ServedModel:
    """The trained run, its CLI (trainer, datamodule, model in memory) and its phantom images."""

    run_dir: Path
    cli: object
    phantoms: Path


@pytest.fixture(scope="session")
def served(tmp_path_factory, shared_artifacts) -> ServedModel:
    """resnet10t at 32 px with letterbox resizing, 1 epoch of 2 batches (fit through `MedselCLI`, the code path
    of `cli.py fit`), then `cli.py test` in this process, which writes evaluation.json with intervals."""
    import cli as entry
    from runs.cli import MedselCLI

    tmp = tmp_path_factory.mktemp("served")
    args = small_fit_args(shared_artifacts, tmp / "runs", "--data.resize=letterbox", "--trainer.limit_train_batches=2",
                          "--trainer.limit_val_batches=1")
    fit = MedselCLI(args=args, run=False)
    fit.trainer.fit(fit.model, datamodule=fit.datamodule)
    run_dir = Path(fit.run_dir)
    assert entry.main(["test", "--config", str(files.RunFiles(run_dir).config), "--trainer.enable_progress_bar=false",
                       "--report.bootstrap=20", "--report.temperature_scaling=false", "--report.heatmap=none"]) == 0
    assert files.RunFiles(run_dir).evaluation.exists()
    return ServedModel(run_dir, fit, shared_artifacts / "datasets" / "chd_phantom")


@pytest.fixture(scope="session")
def predictor(served) -> Predictor:
    return Predictor(locate(served.run_dir), "cpu", "gradcam")


@pytest.fixture(scope="session")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor, Limits(max_bytes=200_000, max_pixels=1_000_000, decode_slots=2)))


def encoded(arr: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save)
    return buf.getvalue()


def png_bytes(size=(80, 60), mode="RGB", seed=0, constant: int | None = None) -> bytes:
    """A noise PNG of `size` = (width, height); `constant` fills it with one value (compresses to a few kB)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0]) if mode == "L" else (size[1], size[0], 3), dtype=np.uint8)
    if constant is not None:
        arr[:] = constant
    return encoded(arr)


def post(client, data: bytes, ctype="image/png", name="x.png", **params):
    return client.post("/predict", files={"file": (name, data, ctype)}, params=params)


@contextmanager
def serve_in_thread(app, **config):
    """`app` on a real uvicorn server in a daemon thread of this process, on a free port; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
