"""The ONNX server in a virtualenv that has no torch: a fresh `python -m venv` with only the `serve-onnx`
dependencies of pyproject.toml installed from the package index, running `python cli.py serve --run <export>`
as a user would, answering the probabilities of the run (slow: it installs ~100 MB of wheels)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
import venv
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO
from tests.serving.conftest import png_bytes


def serve_onnx_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve-onnx"]


def torch_free_python(root: Path) -> Path:
    """A new virtualenv (with pip) holding only the serve-onnx requirements; skips when they cannot be installed."""
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *serve_onnx_requirements()],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"the serve-onnx requirements could not be installed from the package index (offline?): "
                    f"{proc.stderr.strip().splitlines()[-1:]}")
    return python


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.slow
def test_onnx_server_runs_in_a_virtualenv_without_torch(onnx_export, trained, tmp_path: Path):
    python = torch_free_python(tmp_path / "venv")
    check = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('torch', 'lightning', 'timm') if u.find_spec(m)])"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "[]", check.stdout + check.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen([str(python), str(REPO / "cli.py"), "serve", "--run", str(onnx_export), "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                info = json.loads(urllib.request.urlopen(f"{url}/model", timeout=2).read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.2)
        else:
            pytest.fail("the ONNX server did not start in 60 s")
        assert info["backend"] == "onnxruntime"
        data = png_bytes((50, 40), seed=9)
        body, ctype = multipart(data)
        answer = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/predict", body, {"Content-Type": ctype})).read())
    finally:
        server.terminate()
        server.wait(30)
    from serving.model import Predictor, locate

    predictor = Predictor(locate(trained.run_dir), "cpu", "none")
    expected = predictor.predict(predictor.preprocess(data, 10**8), False)
    assert answer["class"] == expected["class"]
    assert max(abs(answer["probabilities"][c] - p) for c, p in expected["probabilities"].items()) <= 1e-4
