"""`cli.py serve` against hostile input, in this process: formats by content only (no other PIL decoder ever
runs), pixel bombs, a streamed body cut at the limit, no absolute paths, unsafe checkpoints, and the model
served from a bare checkpoint elsewhere giving `cli.py predict`'s probabilities."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from errors import ConfigError
from runs import files
from serving.app import Limits, create_app
from serving.images import ACCEPTED_FORMATS, decode_upload
from serving.model import Predictor, locate
from tests.serving.conftest import encoded, png_bytes, post

OTHER_FORMATS = ["GIF", "WEBP", "ICO", "PCX", "TGA", "PPM", "EPS", "SGI", "IM", "SPIDER", "DDS"]


def other_format(fmt: str) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(arr).convert("F") if fmt == "SPIDER" else Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_other_formats_are_415_and_never_reach_their_decoder(client, monkeypatch):
    """GIF, WebP, EPS (Ghostscript), ... labelled image/png or octet-stream: 415, and PIL is never asked to
    open them with any plugin but PNG/JPEG/BMP/TIFF."""
    Image.init()
    called: list[str] = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt not in ACCEPTED_FORMATS:
            def spy(*args, _fmt=fmt, _factory=factory, **kwargs):
                called.append(_fmt)
                return _factory(*args, **kwargs)

            monkeypatch.setitem(Image.OPEN, fmt, (spy, accept))
    for fmt in OTHER_FORMATS:
        data = other_format(fmt)
        called.clear()
        for ctype in ("image/png", "application/octet-stream"):
            r = post(client, data, ctype)
            assert r.status_code == 415, (fmt, ctype, r.text)
        assert called == [], fmt
        Image.open(io.BytesIO(data)).close()
        assert fmt in called  # PIL itself does read it, through the spied plugin


def forged_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height."""
    small = png_bytes((8, 8), constant=0)
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return small[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + small[33:]


@pytest.mark.parametrize("side", [1001, 30000])
def test_pixel_bombs_are_413(client, side):
    r = post(client, forged_png(side, side))
    assert r.status_code == 413, r.text
    assert "pixels" in r.json()["detail"]


def test_a_large_image_is_reduced_on_load_close_to_the_training_path(predictor):
    """A 960x640 upload is box-reduced right after decoding; the model input stays within a few grey levels
    of decoding every pixel and resizing, as training does."""
    from datamodules.images import decode, resize

    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        data = encoded(np.asarray(Image.fromarray(small).resize((960, 640), Image.Resampling.BICUBIC)), fmt)
        served = decode_upload(data, 3, (32, 32), "letterbox", 10**8).astype(int)
        training = resize(decode(data, 3), (32, 32), "letterbox").astype(int)
        assert np.abs(served - training).mean() < 3, fmt


PART_HEADER = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'


def chunked_receive(total: int, chunk: int, sent: list[int]):
    """An ASGI `receive` yielding a multipart file part of `total` bytes lazily, in `chunk`-sized messages,
    counting what the application took."""
    async def receive():
        if sent[0] >= total:
            return {"type": "http.disconnect"}
        body = PART_HEADER if sent[0] == 0 else b"\0" * chunk
        sent[0] += len(body)
        return {"type": "http.request", "body": body, "more_body": sent[0] < total}

    return receive


@pytest.mark.parametrize("declared", [None, 2**30])
def test_a_1gb_body_is_413_after_reading_less_than_twice_the_limit(predictor, declared):
    """A 1 GB body, chunked (no Content-Length) or declared: 413, and the app read < 2 x max_bytes of it."""
    limits = Limits(max_bytes=1_000_000, max_pixels=10**6, decode_slots=1)
    app = create_app(predictor, limits)
    read, messages = [0], []
    headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    headers += [(b"content-length", str(declared).encode())] if declared else [(b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def send(message):
        messages.append(message)

    asyncio.run(app(scope, chunked_receive(2**30, 64 * 1024, read), send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 413 and (b"connection", b"close") in start["headers"]
    assert b"larger than the limit of 1000000 bytes" in b"".join(m.get("body", b"") for m in messages)
    assert read[0] < 2 * limits.max_bytes


def test_model_description_has_no_absolute_path(client):
    def strings(value):
        if isinstance(value, dict):
            return [s for v in [*value.keys(), *value.values()] for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    info = client.get("/model").json()
    assert info["checkpoint"] == f"{files.CHECKPOINTS}/{files.BEST}.ckpt"
    assert not [s for s in strings(info) if s.startswith("/") or s.startswith("~") or ":\\" in s]


def test_docs_scripts_are_served_locally(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        scripts = [part.split('"')[0] for part in html.split('src="')[1:]]
        assert scripts and all(src.startswith("/") for src in scripts), scripts
        assert "https://" not in html.replace("https://fonts", "")
        assert client.get(scripts[0]).status_code == 200 and len(client.get(scripts[0]).content) > 100_000
    assert client.get("/openapi.json").json()["paths"]["/predict"]


def test_a_pickle_checkpoint_is_one_error_line_and_never_unpickled(served, tmp_path, capsys, monkeypatch):
    import uvicorn

    import cli as entry

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = torch.load(files.RunFiles(served.run_dir).best_checkpoint, map_location="cpu", weights_only=True)
    ckpt["extra"] = Payload()
    torch.save(ckpt, tmp_path / "unsafe.ckpt")
    with pytest.raises(ConfigError, match="not a weights-only checkpoint"):
        Predictor(locate(tmp_path / "unsafe.ckpt"), "cpu")
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("the server started"))
    assert entry.main(["serve", "--run", str(tmp_path / "unsafe.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unsafe.ckpt: not a weights-only checkpoint"), err
    assert not marker.exists()


def test_bare_checkpoint_elsewhere_serves_like_cli_predict(served, tmp_path, monkeypatch):
    """The letterbox model copied out of its run and served from another working directory gives the
    probabilities of `predict` (the trainer over the same DataModule) on a non-square image."""
    folder = tmp_path / "images"
    folder.mkdir()
    phantom = np.asarray(Image.open(served.phantoms / "PDA" / "PDA_003.png"))
    image = encoded(np.ascontiguousarray(phantom[:, 20:110]))  # 128 x 90: letterbox pads, squash would stretch
    (folder / "x.png").write_bytes(image)
    dm = served.cli.datamodule
    monkeypatch.setattr(dm, "predict_source", str(folder))
    (expected,) = served.cli.trainer.predict(served.cli.model, datamodule=dm,
                                             ckpt_path=str(files.RunFiles(served.run_dir).best_checkpoint))
    (tmp_path / "elsewhere").mkdir()
    bare = shutil.copy(files.RunFiles(served.run_dir).best_checkpoint, tmp_path / "elsewhere" / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    predictor = Predictor(locate(Path("elsewhere/model.ckpt")), "cpu")
    client = TestClient(create_app(predictor))
    info = client.get("/model").json()
    assert info["input"]["resize"] == "letterbox" and info["checkpoint"] == "model.ckpt" and Path(bare).exists()
    served_probs = post(client, image).json()["probabilities"]
    for j, c in enumerate(info["classes"]):
        assert abs(served_probs[c] - float(expected[0, j])) < 1e-5, (served_probs, expected)


def test_sweep_folder_serves_its_winner_from_any_directory(served, predictor, tmp_path, monkeypatch):
    """winner.json's run_dir is relative to the sweep folder: served from elsewhere, the sweep gives the run's
    model and test metrics; without the run directory it falls back to winner.ckpt."""
    sweep = tmp_path / "sweeps" / "demo"
    run = files.RunFiles(sweep / "runs" / "winner")
    run.checkpoints.mkdir(parents=True)
    shutil.copy(files.RunFiles(served.run_dir).best_checkpoint, run.best_checkpoint)
    shutil.copy(files.RunFiles(served.run_dir).evaluation, run.evaluation)
    (sweep / files.WINNER).write_text(json.dumps({"run_dir": "runs/winner", "sweep": "demo"}))
    shutil.copy(files.RunFiles(served.run_dir).best_checkpoint, sweep / files.WINNER_CKPT)
    monkeypatch.chdir(tmp_path / "sweeps")
    image = (served.phantoms / "ASD" / "ASD_001.png").read_bytes()
    expected = predictor.predict(predictor.preprocess(image, 10**6), False)["probabilities"]
    client = TestClient(create_app(Predictor(locate("demo"), "cpu")))
    info = client.get("/model").json()
    assert info["checkpoint"] == "runs/winner/checkpoints/best.ckpt" and info["selected_by_sweep"]["sweep"] == "demo"
    assert info["test_metrics"]["metrics"]["acc"]["value"] == served_metrics(served)["acc"]["value"]
    assert post(client, image).json()["probabilities"] == pytest.approx(expected, abs=1e-6)
    shutil.rmtree(sweep / "runs")
    fallback = locate("demo")
    assert fallback.checkpoint == Path("demo") / files.WINNER_CKPT and fallback.label == files.WINNER_CKPT
    assert fallback.run_dir is None and fallback.evaluation is None


def served_metrics(served) -> dict:
    return json.loads(files.RunFiles(served.run_dir).evaluation.read_text())["metrics"]


def test_dicom_is_read_by_the_data_layer_as_in_training(client, predictor):
    """A CT slice as a DICOM file (whatever its label): the data layer's DICOM decoder with the checkpoint's
    `data.dicom` settings gives the model input; a header claiming too many pixels is 413 before decoding."""
    from datamodules.images import decode, resize
    from tests.datamodules.test_dicom import dicom_bytes

    stored = np.random.default_rng(2).integers(0, 3000, (48, 64)).astype(np.int16)
    data = dicom_bytes(stored, slope=1, intercept=-1024, window=(40, 400))
    r = post(client, data, "application/octet-stream", name="slice.dcm")
    assert r.status_code == 200, r.text
    expected = predictor.predict(resize(decode(data, predictor.channels, predictor.dicom), predictor.image_size,
                                        "letterbox"), False)["probabilities"]
    assert r.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
    header_only = dicom_bytes(np.zeros((2, 2), np.int16), data=b"\0" * 8)
    huge = header_only.replace(b"\x28\x00\x10\x00US\x02\x00\x02\x00", b"\x28\x00\x10\x00US\x02\x00\xd0\x07")
    huge = huge.replace(b"\x28\x00\x11\x00US\x02\x00\x02\x00", b"\x28\x00\x11\x00US\x02\x00\xd0\x07")  # 2000 x 2000
    assert huge != header_only
    r = post(client, huge)
    assert r.status_code == 413 and "2000x2000" in r.json()["detail"], r.text
