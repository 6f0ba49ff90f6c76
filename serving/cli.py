"""`python cli.py serve --run artifacts/sweeps/<name>` (or a run directory, a .ckpt file, or an ONNX export
folder of `cli.py export`, which is served by ONNX Runtime without importing torch).

Starts a local web server (127.0.0.1 by default): the upload page at `/`, the JSON API at `/predict`,
`/health`, `/model`, its OpenAPI schema at `/openapi.json` and docs at `/docs` and `/redoc` (served
locally, they work offline). The model and its preprocessing come from the checkpoint alone. A model that
cannot be served (no checkpoint, an empty file, one that is not weights-only), an invalid option (a port
outside 1-65535, no decode slots) or a port already in use is one `error:` line and exit code 2; Ctrl-C stops
the server with exit code 0. docs/limits.md lists the limits and what each answers.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import Literal

from jsonargparse import ArgumentParser

from errors import ConfigError
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
        decode_seconds: wall-clock limit of one decode; past it the decode is stopped and answered 413.
        read_timeout: seconds a client may take to send its request headers, and its body (plus one second
            per 64 KiB); a slower client is disconnected.
        heatmap: Grad-CAM variant for the overlay, or none.
        device: "cpu", "cuda" (default: cuda when available).
    """

    run: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_bytes: int = Limits.max_bytes
    max_pixels: int = Limits.max_pixels
    decode_slots: int = field(default_factory=default_decode_slots)
    decode_seconds: float = Limits.decode_seconds
    read_timeout: float = Limits.read_timeout
    heatmap: Literal["gradcam", "gradcam++", "none"] = "gradcam"
    device: str | None = None


def limits_of(cfg: ServeConfig) -> Limits:
    """The server's limits; raises errors.ConfigError naming the option when one cannot work."""
    if not 1 <= cfg.port <= 65535:
        raise ConfigError(f"--port {cfg.port}: a TCP port is 1-65535 (default 8000; ports below 1024 need root)")
    for name, low in (("max_bytes", 1), ("max_pixels", 1), ("decode_slots", 1)):
        if getattr(cfg, name) < low:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be at least {low} "
                              f"({'no image could ever be decoded' if name == 'decode_slots' else 'every upload would be refused'})")
    for name in ("decode_seconds", "read_timeout"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be a positive number of seconds")
    return Limits(cfg.max_bytes, cfg.max_pixels, cfg.decode_slots, cfg.decode_seconds, cfg.read_timeout)


def build_app(cfg: ServeConfig):
    """The application for `cfg`; raises errors.ConfigError when the model cannot be served."""
    from export.layout import is_export_dir
    from serving.app import create_app

    limits = limits_of(cfg)
    if is_export_dir(cfg.run):  # ONNX Runtime, no torch imported
        from serving.onnx_backend import OnnxPredictor

        predictor = OnnxPredictor(cfg.run)
    else:
        from serving.model import Predictor, locate

        predictor = Predictor(locate(cfg.run), cfg.device, cfg.heatmap)
    return create_app(predictor, limits)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one `error:` line (uvicorn logs it and exits 1
    or 3). Raises errors.ConfigError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e}); use e.g. 127.0.0.1 or 0.0.0.0") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: already in use on {host} (another server is running there); "
                              "stop it or choose another port, e.g. --port 8001") from None
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="cli.py serve", description=__doc__)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(ServeConfig, None)
    args = parser.parse_args(argv)
    cfg = ServeConfig(**{k: getattr(args, k) for k in ServeConfig.__dataclass_fields__})
    import uvicorn

    from serving import sandbox
    from serving.limits import header_timeout_protocol, return_freed_images_to_os

    return_freed_images_to_os()
    app = build_app(cfg)
    sock = bind(cfg.host, cfg.port)
    sandbox.start()
    print(f"[serve] {app.title}: http://{cfg.host}:{cfg.port}/  (API docs: /docs)", flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                            http=header_timeout_protocol(cfg.read_timeout))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown (uvicorn.run catches it too)
        pass
    return 0
