"""What one request may cost the server: bytes read, pixels decoded, decodes in flight.

Defaults (documented in the README's serving section):

- `max_bytes` 25 MiB per upload, counted while the body streams in, with or without Content-Length;
- `max_pixels` 36 million (6000 x 6000): above any radiograph or mammogram export, and 700 times a 224-px
  model's input, so every real image fits with a wide margin while one decode stays under ~220 MB
  (6 bytes per pixel in the worst case: a 16-bit image and its float copy);
- `decode_slots` min(CPU count, 4) decodes at a time, so the decoding memory stays under
  decode_slots x max_pixels x 6 bytes (about 860 MB) however many uploads arrive together.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body


def return_freed_images_to_os() -> bool:
    """Make glibc give every freed image buffer back to the OS (a fixed 1 MiB mmap threshold).

    glibc raises its mmap threshold after the first large free, so later image buffers come from per-thread
    heaps that keep the memory after the request: 8 parallel 36-MP uploads left the server 830 MB larger.
    No Python library sets this; `mallopt` is one libc call. Returns False where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def default_decode_slots() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


@dataclass
class Limits:
    """Upload limits.

    Attributes:
        max_bytes: largest accepted upload (the file), in bytes.
        max_pixels: largest accepted width x height, checked from the header before decoding.
        decode_slots: images decoded at the same time; more uploads wait for a slot.
    """

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 36_000_000
    decode_slots: int = field(default_factory=default_decode_slots)

    @property
    def max_body(self) -> int:
        return self.max_bytes + MULTIPART_OVERHEAD


class BodyTooLarge(Exception):
    """Raised into the application when the body passes the limit; the 413 has already been sent."""


class BodyLimit:
    """Pure ASGI middleware: answers 413 as soon as a request body passes `max_body` bytes and stops reading.

    Starlette parses a multipart body only after receiving all of it (spooling it to a temporary file), and
    a chunked upload has no Content-Length to check up front, so the bytes are counted here as they
    arrive. FastAPI's own `max_body_size` exists only in its newest releases and answers without saying
    what the limit is; this works with every FastAPI the project accepts.

    Args:
        app: the wrapped application.
        max_body: largest accepted body in bytes.
        max_bytes: the upload limit named in the 413 message.
    """

    def __init__(self, app: ASGIApp, max_body: int, max_bytes: int):
        self.app = app
        self.max_body = max_body
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": f"upload is larger than the limit of {self.max_bytes} bytes"}).encode()
        # `connection: close` makes the server drop the connection instead of reading the rest of the body.
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._reject(send)  # the body is never read
        state = {"received": 0, "rejected": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    if not state["started"]:
                        state["rejected"] = True
                        await self._reject(send)
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if state["rejected"]:
                return  # the 413 went out already; whatever the app makes of the aborted body is dropped
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise
