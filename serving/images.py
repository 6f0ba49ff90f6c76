"""Uploaded bytes -> the model's input, with bounded memory and only the formats a clinic exports.

The training path (`datamodules.images.decode` then `resize`) decodes every pixel and then resizes. An upload
can be a 36-megapixel PNG, so the server instead:

- opens it with PIL restricted to `ACCEPTED_FORMATS` (`Image.open(formats=...)`): the format is read from
  the magic bytes, never from the client's label, and no other PIL plugin (GIF, WebP, EPS -> Ghostscript, ...)
  is ever asked to parse the bytes;
- checks width x height from the header before any pixel is decoded, and what else a decoder would spend
  beyond it (TIFF tiles and strips, JPEG scans, DICOM stored bytes, inflated size and codestream geometry:
  `datamodules.decode_limits`);
- lets the JPEG decoder scale down by DCT (`Image.draft`) and box-reduces other formats right after the
  load (`Image.reduce`), keeping at least `MARGIN` times the model's input so the final area resize is the
  same as training's; at most one full-size copy of the pixels exists at a time.

Images that need no reduction (at most `MARGIN` times the input size) go through exactly the training path's
pixel conversion, so they give the same probabilities as `cli.py predict`.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image

from datamodules.decode_limits import DecodeBudget
from datamodules.dicom import (
    DicomConfig,
    DicomDecodeError,
    DicomTooLarge,
    NotDicom,
    decode_dicom,
    looks_like_dicom,
)
from datamodules.images import (
    ImageDecodeError,
    ResizeMode,
    _pil_to_array,
    corrupt_reason,
    pre_decode_problem,
    resize,
)

# What PIL may detect. "JPEG" also covers its MPO variant (multi-picture JPEG from cameras).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# Keep this many times the model's input before the final area resize: the box reduction then only removes
# detail the model's input cannot hold anyway.
MARGIN = 4
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class UnsupportedImage(ImageDecodeError):
    """Not one of the accepted formats: PNG, JPEG, BMP, TIFF, DICOM (HTTP 415)."""


class TooManyPixels(ImageDecodeError):
    """Width x height over the server's limit, or a decompression bomb (HTTP 413)."""


def open_upload(source: bytes | BinaryIO, max_pixels: int) -> Image.Image:
    """Open an upload lazily (header only) and check its format and pixel count.

    Raises:
        UnsupportedImage: empty, or not PNG/JPEG/BMP/TIFF by content.
        TooManyPixels: more than `max_pixels`, or more than PIL's decompression-bomb limit.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        img = Image.open(stream, formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"image has too many pixels ({e})") from None
    except MemoryError:
        raise
    except Exception:  # UnidentifiedImageError, or what a PIL plugin raises on a corrupt header
        raise UnsupportedImage("not an image this server reads: send a PNG, JPEG, BMP, TIFF or DICOM file") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise TooManyPixels(f"image has {width}x{height} pixels, over the limit of {max_pixels}")
    problem = pre_decode_problem(img, _jpeg_bytes(img, stream), DecodeBudget.for_server(max_pixels))
    if problem is not None:
        img.close()
        raise TooManyPixels(problem)
    return img


def _jpeg_bytes(img: Image.Image, stream: BinaryIO) -> bytes:
    """The whole upload for a JPEG (its scans are counted before decoding), else nothing."""
    if img.format not in ("JPEG", "MPO"):
        return b""
    at = stream.tell()
    stream.seek(0)
    data = stream.read()
    stream.seek(at)
    return data


def reduction_factor(width: int, height: int, size: tuple[int, int]) -> int:
    """Largest integer box reduction that keeps at least MARGIN x the model's input (height, width)."""
    return max(1, min(width // (MARGIN * size[1]), height // (MARGIN * size[0])))


def _load_reduced(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[float, float] | None]:
    """Decode, then box-reduce towards MARGIN x `size`; returns the image and, for >8-bit images, the full
    image's (min, max), so the uint8 window is the one training computes from every pixel."""
    if img.format in ("JPEG", "MPO") and reduction_factor(img.width, img.height, size) > 1:
        img.draft(None, (MARGIN * size[1], MARGIN * size[0]))  # DCT scaling: decodes fewer pixels
    img.load()  # a truncated file fails here
    factor = reduction_factor(img.width, img.height, size)
    if factor == 1:
        return img, None
    window = None
    if img.mode in _HIGH_BIT_MODES:
        window = img.getextrema()
        img = img.convert("F")
    elif img.mode in ("1", "P", "PA"):  # palette indices and single bits cannot be averaged
        img = img.convert("L" if img.mode == "1" else "RGB")
    # Whole blocks only: a partial last block would be averaged as a full one and skew the geometry.
    return img.reduce(factor, box=(0, 0, img.width - img.width % factor, img.height - img.height % factor)), window


def _oriented(img: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation read before the reduction (a reduced copy has lost TIFF tags); the same
    mapping as `ImageOps.exif_transpose`, which training uses on the full image."""
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return img.transpose(method) if method is not None else img


def _windowed(img: Image.Image, window: tuple[float, float]) -> Image.Image:
    """A reduced >8-bit image scaled to uint8 with the full image's min-max window (as `_to_uint8` does)."""
    lo, hi = float(window[0]), float(window[1])
    arr = np.asarray(img, dtype=np.float32)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return Image.fromarray(np.zeros(arr.shape, np.uint8))
    return Image.fromarray(np.clip(np.round((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8))


def _decode_dicom(data: bytes, channels: int, size: tuple[int, int], mode: ResizeMode, max_pixels: int,
                  dicom: DicomConfig | None) -> np.ndarray:
    """A DICOM upload through the data layer's own decoder (window, frame, MONOCHROME1 as in training), within
    the server's budget: pixels, stored bytes and inflated size are checked before anything is decoded."""
    try:
        return resize(decode_dicom(data, channels, dicom, DecodeBudget.for_server(max_pixels)), size, mode)
    except DicomTooLarge as e:
        raise TooManyPixels(str(e)) from None
    except NotDicom:
        raise UnsupportedImage("not an image this server reads: send a PNG, JPEG, BMP, TIFF or DICOM file") from None
    except (DicomDecodeError, ValueError) as e:
        raise ImageDecodeError(str(e)) from None


def decode_upload(
    source: bytes | BinaryIO, channels: int, size: tuple[int, int], mode: ResizeMode, max_pixels: int,
    dicom: DicomConfig | None = None,
) -> np.ndarray:
    """Encoded upload -> (H, W, C) uint8 model input; DICOM (a Part 10 file, "DICM" at byte 128, or a raw
    dataset) goes through the data layer's DICOM decoder with the model's training settings.

    Args:
        source: the file's bytes, or a seekable binary file.
        channels: 3 (RGB) or 1 (grayscale), as the model was trained.
        size: the model's input (height, width).
        mode: "squash" or "letterbox", as the model was trained.
        max_pixels: largest accepted width x height.
        dicom: how the model's training data turned DICOM files into 8-bit images (window, frame).

    Raises:
        UnsupportedImage: not an accepted format (415).
        TooManyPixels: over `max_pixels` (413).
        ImageDecodeError: truncated or corrupt (422).
    """
    head = source[:132] if isinstance(source, bytes) else source.read(132)
    if not isinstance(source, bytes):
        source.seek(0)
    if looks_like_dicom(head):
        return _decode_dicom(source if isinstance(source, bytes) else source.read(), channels, size, mode, max_pixels, dicom)
    img = open_upload(source, max_pixels)
    try:
        orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
        img, window = _load_reduced(img, size)
        img = _oriented(img, orientation)
        if img.width == 0 or img.height == 0:
            raise ImageDecodeError("image has zero width or height")
        arr = _pil_to_array(_windowed(img, window) if window else img, channels)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, struct.error, IndexError... on corrupt files
        raise ImageDecodeError(corrupt_reason(e)) from None
    finally:
        img.close()
    return resize(arr, size, mode)
