"""`python cli.py serve --run artifacts/sweeps/<name>` (or a run directory, a .ckpt file, or an ONNX export
folder of `cli.py export`, which is served by ONNX Runtime without importing torch).

Starts a local web server (127.0.0.1 by default): the upload page at `/`, the JSON API at `/predict`,
`/health`, `/model`, its OpenAPI schema at `/openapi.json` and docs at `/docs` and `/redoc` (served
locally, they work offline). The model and its preprocessing come from the checkpoint alone. A model that
cannot be served (no checkpoint, or one that is not weights-only) is one `error:` line and exit code 2;
Ctrl-C stops the server with exit code 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jsonargparse import ArgumentParser

from serving.limits import Limits, default_decode_slots


@dataclass
class ServeConfig:
    """Attributes:
        run: a sweep folder (serves its winner), a run directory, a checkpoint file, or an ONNX export folder
            (`cli.py export`; served by ONNX Runtime without torch, no heat maps).
        host: interface to listen on; 127.0.0.1 keeps the server private to this machine.
        port: TCP port.
        max_bytes: largest accepted upload in bytes (counted while it streams in).
        max_pixels: largest accepted image (width x height), checked before decoding.
        decode_slots: images decoded at the same time (default: CPU count, at most 4); bounds memory.
        heatmap: Grad-CAM variant for the overlay, or none.
        device: "cpu", "cuda" (default: cuda when available).
    """

    run: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_bytes: int = Limits.max_bytes
    max_pixels: int = Limits.max_pixels
    decode_slots: int = field(default_factory=default_decode_slots)
    heatmap: Literal["gradcam", "gradcam++", "none"] = "gradcam"
    device: str | None = None


def build_app(cfg: ServeConfig):
    """The application for `cfg`; raises errors.ConfigError when the model cannot be served."""
    from export.layout import is_export_dir
    from serving.app import create_app

    if is_export_dir(cfg.run):  # ONNX Runtime, no torch imported
        from serving.onnx_backend import OnnxPredictor

        predictor = OnnxPredictor(cfg.run)
    else:
        from serving.model import Predictor, locate

        predictor = Predictor(locate(cfg.run), cfg.device, cfg.heatmap)
    return create_app(predictor, Limits(cfg.max_bytes, cfg.max_pixels, cfg.decode_slots))


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="cli.py serve", description=__doc__)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(ServeConfig, None)
    args = parser.parse_args(argv)
    cfg = ServeConfig(**{k: getattr(args, k) for k in ServeConfig.__dataclass_fields__})
    import uvicorn

    from serving.limits import return_freed_images_to_os

    return_freed_images_to_os()
    app = build_app(cfg)
    print(f"[serve] {app.title}: http://{cfg.host}:{cfg.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return 0
