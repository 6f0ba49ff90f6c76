"""Decode any image a clinic exports into a uint8 array of fixed size and channel count.

Medical exports mix PNG/JPEG/BMP/TIFF/DICOM, grayscale, RGB, RGBA, palette and 16-bit files; every path into a
model (training cache, `cli.py predict`, the web server) goes through `load_image` so they all see the
same pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from datamodules.decode_limits import (
    DECODE_TIME_LIMIT_S,
    DecodeBudget,
    DecodeTimeout,
    call_with_time_limit,
    jpeg_problem,
    tiff_problem,
)
from datamodules.dicom import DicomConfig, DicomDecodeError, decode_dicom, dicom_size, looks_like_dicom

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
ResizeMode = Literal["squash", "letterbox"]

MAX_SCAN_PIXELS = 16384 * 16384


def allow_large_scans() -> None:
    """Raise PIL's decompression-bomb limit to a 16k x 16k radiograph (the guard stays on; whole slides are
    not in scope). PIL's limit is process-wide, so the program entry points call this once (`cli.py`, a
    sweep's trial processes) rather than importing this module changing it as a side effect."""
    Image.MAX_IMAGE_PIXELS = MAX_SCAN_PIXELS


class ImageDecodeError(ValueError):
    """A file that cannot be turned into pixels; the message says why in words a user understands."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a >8-bit or float image to uint8 with a per-image min-max window.

    Fixed scaling by 65535 would make 12-bit X-ray exports nearly black, so the image's own range is used.
    """
    arr = arr.astype(np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    """Convert any PIL mode to (H, W, channels) uint8; alpha is dropped, as study 002 did."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = _to_uint8(np.asarray(img))
        gray = Image.fromarray(arr)  # 2-D uint8 -> mode "L"
        img = gray if channels == 1 else gray.convert("RGB")
    elif img.mode == "1" or img.mode == "LA" or img.mode == "L":
        img = img.convert("L") if channels == 1 else img.convert("RGB")
    else:  # RGB, RGBA, P, PA, CMYK, YCbCr, LAB, HSV
        img = img.convert("RGB")
        if channels == 1:
            img = img.convert("L")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def resize(arr: np.ndarray, size: tuple[int, int], mode: ResizeMode = "squash") -> np.ndarray:
    """Resize (H, W, C) uint8 to `size` = (height, width).

    `squash` stretches to the target as the studies did; `letterbox` keeps the aspect ratio and pads with 0.
    """
    h, w = size
    channels = arr.shape[2]
    shrink = arr.shape[0] > h or arr.shape[1] > w
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    if mode == "squash":
        out = cv2.resize(arr, (w, h), interpolation=interp)
    elif mode == "letterbox":
        scale = min(h / arr.shape[0], w / arr.shape[1])
        nh, nw = max(1, round(arr.shape[0] * scale)), max(1, round(arr.shape[1] * scale))
        inner = cv2.resize(arr, (nw, nh), interpolation=interp)
        out = np.zeros((h, w, channels), np.uint8)
        top, left = (h - nh) // 2, (w - nw) // 2
        out[top : top + nh, left : left + nw] = inner.reshape(nh, nw, channels)
    else:
        raise ValueError(f"resize mode must be 'squash' or 'letterbox', got {mode!r}")
    return out.reshape(h, w, channels)


def image_size_of(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header only, without decoding the pixels.

    Raises:
        ImageDecodeError: empty or not an image.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if looks_like_dicom(data):
        try:
            return (*dicom_size(data), "DICOM")
        except DicomDecodeError as e:
            raise ImageDecodeError(str(e)) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, img.format or "?"
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"too many pixels: {e}") from None
    except MemoryError:
        raise
    except Exception:  # UnidentifiedImageError, or what a PIL plugin raises on a corrupt header
        raise ImageDecodeError("not a readable image (unknown or corrupt format)") from None


def pre_decode_problem(img: Image.Image, data: bytes, budget: DecodeBudget) -> str | None:
    """A reason to refuse an opened (header-only) image before its pixels are decoded: a TIFF whose tiles or
    strips pass the budget, a JPEG with too many scans (see `datamodules.decode_limits`)."""
    if img.format == "TIFF":
        return tiff_problem(img, budget.max_pixels)
    if img.format in ("JPEG", "MPO"):
        return jpeg_problem(data)
    return None


def decode(data: bytes, channels: int = 3, dicom: DicomConfig | None = None,
           budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode encoded image bytes (any PIL format, or DICOM) to (H, W, channels) uint8, fully, so truncated
    files fail here.

    Args:
        data: the file's bytes.
        channels: 3 (RGB) or 1 (grayscale).
        dicom: window and frame for DICOM files (see `datamodules.dicom.decode_dicom`).
        budget: what the decode may hold (default: the data layer's, `DecodeBudget.for_data()`).

    Raises:
        ImageDecodeError: empty, not an image, truncated, over the budget or otherwise unreadable.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    budget = budget or DecodeBudget.for_data()
    if looks_like_dicom(data):
        try:
            return decode_dicom(data, channels, dicom, budget)
        except (DicomDecodeError, ValueError) as e:
            raise ImageDecodeError(str(e)) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            problem = pre_decode_problem(img, data, budget)
            if problem is not None:
                raise ImageDecodeError(problem)
            img.load()  # forces the full decode: a truncated file raises here, not later in a worker
            img = ImageOps.exif_transpose(img)
            if img.width == 0 or img.height == 0:
                raise ImageDecodeError("image has zero width or height")
            return _pil_to_array(img, channels)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"too many pixels: {e}") from None
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, struct.error, IndexError... on corrupt files
        raise ImageDecodeError(corrupt_reason(e)) from None


def corrupt_reason(e: Exception) -> str:
    """A decoder's exception on a corrupt file as one line a user can act on."""
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    if "truncated" in msg.lower():
        return f"truncated file ({msg})"
    if isinstance(e, (OSError, SyntaxError, ValueError)):
        return msg
    return f"corrupt image ({type(e).__name__}: {msg})"


def decode_within_time(data: bytes, channels: int = 3, dicom: DicomConfig | None = None,
                       seconds: float = DECODE_TIME_LIMIT_S) -> np.ndarray:
    """`decode`, reported as a bad image once it has taken `seconds` of wall time (see
    `datamodules.decode_limits.call_with_time_limit`).

    Raises:
        ImageDecodeError: as `decode`, or past the time limit.
    """
    try:
        return call_with_time_limit(decode, seconds, data, channels, dicom)
    except DecodeTimeout as e:
        raise ImageDecodeError(f"{e}, the limit per image: re-save or re-export the file") from None


def load_image(
    path: str | Path, size: tuple[int, int], channels: int = 3, mode: ResizeMode = "squash",
    dicom: DicomConfig | None = None,
) -> np.ndarray:
    """Read, decode and resize one file to (size[0], size[1], channels) uint8.

    Raises:
        ImageDecodeError: missing, empty or unreadable file.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError("file does not exist") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from None
    return resize(decode(data, channels, dicom), size, mode)
