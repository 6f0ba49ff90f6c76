"""What one request may cost the server: bytes read, pixels decoded, decodes in flight.

Defaults (documented in the README's serving section):

- `max_bytes` 25 MiB per upload, counted while the body streams in, with or without Content-Length;
- `max_pixels` 36 million (6000 x 6000): above any radiograph or mammogram export, and 700 times a 224-px
  model's input, so every real image fits with a wide margin while one decode stays under ~220 MB
  (6 bytes per pixel in the worst case: a 16-bit image and its float copy);
- `decode_slots` min(CPU count, 4) decodes at a time, so the decoding memory stays under
  decode_slots x max_pixels x 6 bytes (about 860 MB) however many uploads arrive together; one of them may
  be a DICOM (pydicom windows in float64), whose budget is max_pixels x 26 bytes;
- `decode_seconds` 10 s of wall time per decode, after which its process is killed (see serving.sandbox);
- `read_timeout` 10 s for a request's headers, and for its body that long plus the time it needs at
  `min_upload_rate` (64 KiB/s): a client that trickles bytes is cut off instead of holding a connection.

Every decode runs in a process whose address space is capped at its budget (serving.sandbox), so these bounds
hold for what a decoder really allocates, not only for what a header claims. docs/limits.md has the table.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body
# Decode memory per pixel: a 16-bit image and its float32 copy (6 bytes); pydicom's stored array, its float64
# rescale and windowing copies (26 bytes, measured on a 36-MP 16-bit DICOM, which 8 bytes per pixel refused).
BYTES_PER_PIXEL = 6
DICOM_BYTES_PER_PIXEL = 26
# Per decode on top of the pixels: the upload's bytes (up to max_bytes, held once by the decode process) and
# the decoders' own buffers.
DECODE_OVERHEAD = 64 * 2**20


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
        decode_slots: images decoded at the same time; more uploads wait for a slot (a DICOM waiting for the
            one DICOM decode at a time waits without a slot).
        decode_seconds: wall-clock limit of one decode; past it the decode is killed and answered 413.
        read_timeout: seconds a client may take to send a request's headers, and (plus the time the body
            needs at `min_upload_rate`) its body; past it the connection is closed (408 for a body).
        min_upload_rate: slowest accepted average upload rate, in bytes per second, after `read_timeout`.
        express_pixels: images up to this size are first tried in one extra decode slot (budget and
            `express_seconds` scaled to it); larger or costlier ones go on to a regular slot. 0: no express slot.
        express_seconds: time limit in the express slot.
    """

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 36_000_000
    decode_slots: int = field(default_factory=default_decode_slots)
    decode_seconds: float = 10.0
    read_timeout: float = 10.0
    min_upload_rate: int = 64 * 1024
    express_pixels: int = 4_000_000
    express_seconds: float = 2.0

    @property
    def max_body(self) -> int:
        return self.max_bytes + MULTIPART_OVERHEAD

    def decode_budget(self, dicom: bool) -> int:
        """Bytes one decode process may allocate: its pixels at the format's worst case, plus the upload."""
        per_pixel = DICOM_BYTES_PER_PIXEL if dicom else BYTES_PER_PIXEL
        return self.max_pixels * per_pixel + self.max_bytes + DECODE_OVERHEAD

    def express_budget(self) -> int:
        """Bytes a decode in the express slot may allocate."""
        return min(self.express_pixels, self.max_pixels) * BYTES_PER_PIXEL + self.max_bytes + DECODE_OVERHEAD

    def decode_memory_bound(self) -> int:
        """Most memory all decodes together can hold: every slot at the image budget, one at the DICOM one, the
        express slot, and per slot the server's own two copies of the upload (read, and pickled to the decode
        process)."""
        decodes = (self.decode_slots - 1) * self.decode_budget(False) + self.decode_budget(True)
        express = self.express_budget() if self.express_pixels else 0
        return decodes + express + (self.decode_slots + bool(self.express_pixels)) * 2 * self.max_bytes


class BodyTooLarge(Exception):
    """Raised into the application when the body passes the limit; the 413 has already been sent."""


class BodyTooSlow(BodyTooLarge):
    """Raised into the application when the body arrives too slowly; the 408 has already been sent."""


def _answer(status: int, detail: str):
    """The ASGI messages of a JSON error that closes the connection (`connection: close` makes the server drop
    it instead of reading the rest of the body)."""
    body = json.dumps({"detail": detail}).encode()
    return [{"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]},
            {"type": "http.response.body", "body": body}]


class BodyLimit:
    """Pure ASGI middleware: answers 413 as soon as a request body passes `max_body` bytes, and 408 when it
    arrives slower than `read_timeout` + its size at `min_rate`, and stops reading.

    Starlette parses a multipart body only after receiving all of it (spooling it to a temporary file), and
    a chunked upload has no Content-Length to check up front, so the bytes are counted here as they
    arrive. FastAPI's own `max_body_size` exists only in its newest releases and answers without saying
    what the limit is; uvicorn has no body timeout at all (its `timeout_keep_alive` only covers idle
    connections between requests), so a client sending 10 bytes a second would hold its connection forever.

    Args:
        app: the wrapped application.
        max_body: largest accepted body in bytes.
        max_bytes: the upload limit named in the 413 message.
        read_timeout: seconds any body may take, on top of its size at `min_rate` (None: no limit).
        min_rate: bytes per second a body must average after `read_timeout`.
    """

    def __init__(self, app: ASGIApp, max_body: int, max_bytes: int, read_timeout: float | None = None,
                 min_rate: int = 64 * 1024):
        self.app = app
        self.max_body = max_body
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.min_rate = min_rate

    async def _reject(self, send: Send, status: int = 413) -> None:
        detail = (f"upload is larger than the limit of {self.max_bytes} bytes" if status == 413 else
                  f"the request body arrived too slowly (more than {self.read_timeout:g} s plus one second per "
                  f"{self.min_rate} bytes); send it again over a faster connection")
        for message in _answer(status, detail):
            await send(message)

    def _remaining(self, started: float, received: int) -> float | None:
        """Seconds left for the next chunk of the body, or None when bodies may take any time."""
        if self.read_timeout is None:
            return None
        return started + self.read_timeout + received / self.min_rate - time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._reject(send)  # the body is never read
        state = {"received": 0, "rejected": False, "started": False, "complete": False}
        began = time.monotonic()

        async def fail(status: int, error: type[Exception]):
            if not state["started"]:
                state["rejected"] = True
                await self._reject(send, status)
            raise error

        async def limited_receive() -> Message:
            remaining = None if state["complete"] else self._remaining(began, state["received"])
            try:
                message = await (receive() if remaining is None else asyncio.wait_for(receive(), max(remaining, 0)))
            except asyncio.TimeoutError:
                await fail(408, BodyTooSlow)
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["complete"] = not message.get("more_body", False)
                if state["received"] > self.max_body:
                    await fail(413, BodyTooLarge)
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


class HeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers take longer than
    `header_timeout` seconds from their first byte (or from the connection's start).

    uvicorn has no such limit: `timeout_keep_alive` ends once any byte arrives, and h11 only bounds the
    headers' size, so 300 connections each sending a header byte every few seconds stay open for good (a
    slowloris). The headers end before the ASGI application is called, so middleware cannot see this; the
    protocol class is uvicorn's documented extension point (`uvicorn.Config(http=...)`).
    """

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_cycle = None
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle is self._waiting_cycle

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            # the first byte of the next request on a kept-alive connection
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and not self._awaiting_headers():
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.logger.warning("%s: request headers took longer than %g s; connection closed",
                                "{}:{}".format(*self.client) if self.client else "client", self.header_timeout)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def header_timeout_protocol(seconds: float) -> type[HeaderTimeout]:
    """The protocol class for `uvicorn.Config(http=...)` with a header timeout of `seconds`."""
    return type("HeaderTimeout", (HeaderTimeout,), {"header_timeout": seconds})
