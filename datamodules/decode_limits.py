"""What one decode may cost, checked on the encoded bytes before a decoder allocates or spends it.

A header's width x height is not the whole cost: a deflated DICOM can inflate to gigabytes around a small
image, a TIFF can claim a tile far larger than its image, a progressive JPEG can repeat a scan thousands of
times, and a compressed DICOM frame can declare a larger geometry than its header. Each check here reads only
the bytes (or the lazily opened PIL header) and returns a reason to refuse, so the training cache and the web
server refuse the same files with the same words. The last resort is a wall-clock limit per decode
(`call_with_time_limit`).

Limits, per decode (a `DecodeBudget`: the server's from its `--max_pixels`, the data layer's from PIL's
decompression-bomb limit and `DATA_MAX_BYTES`):

- width x height: `max_pixels`;
- stored pixel bytes of one DICOM frame, and a deflated DICOM dataset once inflated: `max_bytes` (the
  server: `max_pixels` x `BYTES_PER_PIXEL`, a 16-bit grey image at the pixel limit); a deflated
  dataset also at most its header plus the pixels its Rows x Columns declare;
- a TIFF's tile grid (the image rounded up to whole tiles): at most `max_pixels`;
- a progressive JPEG: at most `MAX_JPEG_SCANS` scans (encoders write about 10);
- a compressed DICOM frame: its codestream's own width x height at most the header's Rows x Columns;
- every decode in the data layer: `DECODE_TIME_LIMIT_S` seconds of wall time.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BYTES_PER_PIXEL = 2  # a 16-bit grey frame at the pixel limit (8-bit RGB at two thirds of it)
DATA_MAX_BYTES = 256 << 20  # a 16-bit grey 11k x 11k frame, an 8-bit RGB 9.4k x 9.4k one
MAX_JPEG_SCANS = 100
DECODE_TIME_LIMIT_S = 30.0
_INFLATE_CHUNK = 1 << 20


@dataclass(frozen=True)
class DecodeBudget:
    """What one decode may hold.

    Attributes:
        max_pixels: largest width x height (and TIFF tile grid).
        max_bytes: largest stored pixel bytes of one DICOM frame, and of a deflated DICOM dataset inflated.
    """

    max_pixels: int
    max_bytes: int

    @classmethod
    def for_server(cls, max_pixels: int) -> DecodeBudget:
        return cls(max_pixels, max_pixels * BYTES_PER_PIXEL)

    @classmethod
    def for_data(cls) -> DecodeBudget:
        """The data layer's: PIL's decompression-bomb threshold (2 x `Image.MAX_IMAGE_PIXELS`, where PIL itself
        refuses; `allow_large_scans` raises it to a 16k x 16k radiograph) and `DATA_MAX_BYTES`."""
        from PIL import Image

        limit = Image.MAX_IMAGE_PIXELS
        return cls(2 * int(limit) if limit else 1 << 40, DATA_MAX_BYTES)


class DecodeTimeout(TimeoutError):
    """A decode ran past its wall-clock limit (the thread is abandoned; its result is never used)."""


def inflate_capped(body: bytes, limit: int, partial: bool = False) -> bytes:
    """Raw-inflate `body` (DICOM's Deflated Explicit VR Little Endian) without ever holding more than `limit`.

    `zlib.decompress` (what pydicom calls) inflates everything first: 1 MB of deflated zeros becomes 1 GiB.
    A decompressobj with `max_length` stops at the limit, so the cost is bounded by it.

    Args:
        body: the deflated bytes.
        limit: most bytes to inflate.
        partial: return the first `limit` bytes instead of raising when there are more.

    Raises:
        ValueError: the data inflates past `limit` (unless `partial`), or is not valid deflate data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = body
    try:
        while pending or not inflater.eof:
            chunk = inflater.decompress(pending, min(_INFLATE_CHUNK, limit + 1 - len(out)))
            out += chunk
            if partial and len(out) >= limit:
                return bytes(out[:limit])
            if len(out) > limit:
                raise ValueError(f"deflated dataset inflates to more than {limit:,} bytes")
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break  # input exhausted (a truncated stream ends here rather than at `eof`)
    except zlib.error as e:
        raise ValueError(f"deflated dataset is not valid deflate data ({e})") from None
    return bytes(out)


def _jpeg_segments(data: bytes, start: int = 2):
    """(marker, payload offset, payload length) of each marker segment of a JPEG stream, stopping at EOI.

    Hand-written because no library reports the scan count of a JPEG without decoding it (Pillow exposes
    neither libjpeg-turbo's scan limit nor the markers). Entropy-coded data after SOS is skipped: there a
    0xFF byte is followed by 0x00 (stuffing) or a restart marker, so the next other marker ends the scan.
    """
    pos, n = start, len(data)
    while pos + 4 <= n:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 4 > n:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return
        if 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):  # RSTn, stuffing and TEM carry no length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        yield marker, pos + 4, length - 2
        pos += 2 + length  # after SOS the entropy-coded data follows: the search above skips its FF00/RSTn


def jpeg_scan_count(data: bytes) -> int:
    """Number of scans (SOS segments) of a JPEG stream."""
    if data[:2] != b"\xff\xd8":
        return 0
    return sum(1 for marker, _, _ in _jpeg_segments(data) if marker == 0xDA)


def jpeg_problem(data: bytes) -> str | None:
    """A reason to refuse a JPEG before decoding it (too many scans), or None."""
    scans = jpeg_scan_count(data)
    if scans > MAX_JPEG_SCANS:
        return (f"JPEG with {scans} scans, over the limit of {MAX_JPEG_SCANS} (encoders write about 10; "
                "repeated scans only make decoding slow): re-save the image")
    return None


def _tiff_tag(img: Any, tag: int) -> int | None:
    """A tile or strip size tag as an int, or None when absent. Raises ValueError when a damaged header gives
    it another type (the fuzzer found RowsPerStrip as the bytes b' ')."""
    value = img.tag_v2.get(tag)
    if isinstance(value, tuple):
        value = value[0] if value else None
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"TIFF tag {tag} holds {value!r}, not a whole number") from None


def tiff_problem(img: Any, max_pixels: int) -> str | None:
    """A reason to refuse an opened (not yet loaded) PIL TIFF whose tiles or strips cost more than the image
    may (libtiff allocates one whole tile or strip per read, whatever the image's own size), or None."""
    width, height = img.size
    try:  # TileWidth, TileLength, RowsPerStrip
        tile_w, tile_h, strip_rows = (_tiff_tag(img, t) for t in (322, 323, 278))
    except ValueError as e:
        return f"damaged TIFF header ({e}): re-save the TIFF"
    if tile_w is not None or tile_h is not None:
        tw, th = max(tile_w or 1, 1), max(tile_h or 1, 1)
        grid = -(-width // tw) * tw * (-(-height // th) * th)
        if grid > max_pixels:
            return (f"TIFF tiles of {tw}x{th} pixels for a {width}x{height} image cover {grid:,} pixels, over the "
                    f"limit of {max_pixels:,}: re-save the TIFF with tiles of at most the image's size")
        return None
    rows = min(strip_rows or height, height)  # clamped to the image as libtiff does
    if rows * width > max_pixels:
        return f"TIFF strips of {width}x{rows} pixels, over the limit of {max_pixels:,}"
    return None


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) a compressed DICOM frame declares in its own codestream (JPEG, JPEG-LS: SOF; JPEG 2000:
    SIZ; a JP2 file: its first codestream), or None for other encodings (RLE decodes to the header's size)."""
    if frame[:2] == b"\xff\xd8":
        for marker, at, _ in _jpeg_segments(frame):
            if marker in (*range(0xC0, 0xD0), 0xF7) and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", frame[at + 1 : at + 5])
                return width, height
        return None
    at = frame.find(b"\xff\x4f\xff\x51") if frame[:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c") else -1
    if at < 0 or len(frame) < at + 24:
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 8 : at + 24])  # SIZ: Xsiz, Ysiz, XOsiz, YOsiz
    return max(xsiz - xo, 0), max(ysiz - yo, 0)


def call_with_time_limit(fn: Callable[..., Any], seconds: float, *args: Any) -> Any:
    """`fn(*args)`, or DecodeTimeout once it has run `seconds` of wall time.

    Python cannot stop a thread inside a C decoder, so a decode past the limit is abandoned: it runs to its
    end in a daemon thread and its result is dropped. The checks above bound what such a decode can cost;
    this bounds how long the caller waits (a process per decode would cost more than most decodes).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread as is
            box["error"] = e

    worker = threading.Thread(target=target, name="medsel-decode", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise DecodeTimeout(f"decoding took longer than {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
