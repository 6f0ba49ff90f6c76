"""DICOM to pixels with pydicom: the modality LUT (rescale slope/intercept), a window (configured, or the
file's VOI LUT / window, or the image's own range), MONOCHROME1 inversion, one frame.

Stored values stay 16-bit (then float, in modality units such as Hounsfield) until the window maps them to
8 bits, so a CT lung window keeps its full precision. `decode_dicom` takes *bytes*: the training cache,
`cli.py predict` and the web server all decode uploads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.decode_limits import DecodeBudget
from datamodules.dicom_read import (
    DicomDecodeError,
    DicomTooLarge,
    NotDicom,
    check_codestream,
    check_elements,
    decode_frame,
    frame_geometry,
    is_dicom,
    is_raw_dicom,
    looks_like_dicom,
    read_dataset,
)

__all__ = ["DicomConfig", "DicomDecodeError", "DicomTooLarge", "NotDicom", "decode_dicom", "dicom_patient_id", "dicom_size",
           "is_dicom", "is_raw_dicom", "looks_like_dicom"]

# (center, width) in modality units (Hounsfield for CT); the usual radiology presets.
WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
@dataclass(frozen=True)
class DicomConfig:
    """How DICOM files become 8-bit images (`data.dicom`).

    Attributes:
        window: a preset name (lung, mediastinum, bone, brain, abdomen) or {center, width} in modality
            units (Hounsfield for CT). None: the file's VOI LUT or window, else the image's own min-max.
        frame: the frame of multi-frame files to use (0-based); None rejects multi-frame files.
    """

    window: str | dict[str, float] | None = None
    frame: int | None = None

    def center_width(self) -> tuple[float, float] | None:
        if self.window is None:
            return None
        if isinstance(self.window, str):
            if self.window not in WINDOW_PRESETS:
                raise ValueError(f"data.dicom.window: unknown preset {self.window!r}; presets: {sorted(WINDOW_PRESETS)} "
                                 "or {center: ..., width: ...}")
            return WINDOW_PRESETS[self.window]
        if set(self.window) != {"center", "width"} or float(self.window["width"]) <= 0:
            raise ValueError(f"data.dicom.window must be a preset or {{center, width > 0}}, got {self.window!r}")
        return float(self.window["center"]), float(self.window["width"])

    def tag(self) -> str:
        """Short text naming these settings (part of the decode cache's folder name)."""
        cw = self.center_width()
        return ("" if cw is None else f"w{cw[0]:g}_{cw[1]:g}") + ("" if self.frame is None else f"f{self.frame}")


def dicom_size(data: bytes, budget: DecodeBudget | None = None) -> tuple[int, int]:
    """(width, height) from the DICOM header only, without decoding the pixels."""
    ds = read_dataset(data, budget or DecodeBudget.for_data(), pixels=False)
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomDecodeError("DICOM file without image (no (0028,0010) Rows / (0028,0011) Columns): not an "
                               "image object (e.g. a structured report or an RT plan)")
    check_elements(ds)
    return int(ds.Columns), int(ds.Rows)


def dicom_patient_id(data: bytes) -> str | None:
    """The PatientID of a DICOM header (None when absent or empty)."""
    value = str(read_dataset(data, DecodeBudget.for_data(), pixels=False).get("PatientID", "") or "").strip()
    return value or None


def _stored_pixels(ds, frame: int | None, budget: DecodeBudget) -> np.ndarray:
    """Stored values of one frame, (H, W) or (H, W, 3), still in their own bit depth; only that frame is
    decoded, after its declared size (and, compressed, its codestream's) has been checked against `budget`."""
    check_elements(ds)
    rows, cols, frames = frame_geometry(ds, budget)
    if frames > 1 and frame is None:
        raise DicomDecodeError(f"multi-frame DICOM ({frames} frames) is not a single image: set data.dicom.frame to "
                               "the frame to use (0-based), or export one file per slice")
    if frame is not None and not 0 <= frame < frames:
        raise DicomDecodeError(f"data.dicom.frame {frame} is outside this file's {frames} frame(s)")
    check_codestream(ds, frame or 0, frames, rows, cols)
    return decode_frame(ds, frame if frames > 1 else None)


# Rows converted to float at a time: a whole-image float64 copy would cost 8 bytes per pixel (290 MB at 36 MP).
_BLOCK_PIXELS = 1 << 20


def _row_blocks(arr: np.ndarray):
    step = max(1, _BLOCK_PIXELS // max(arr.shape[1], 1))
    return (slice(r, r + step) for r in range(0, arr.shape[0], step))


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window of DICOM PS3.3 C.11.2.1.2.1 to 0..255."""
    lo = center - 0.5 - (width - 1) / 2
    scaled = (values - lo) / max(width - 1, 1e-6)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _minmax_blocks(arr: np.ndarray, convert) -> np.ndarray:
    """uint8 of `convert(arr)` scaled by its own min-max, converting one block of rows at a time."""
    blocks = list(_row_blocks(arr))
    lo = min(float(np.min(convert(arr[b]))) for b in blocks)
    hi = max(float(np.max(convert(arr[b]))) for b in blocks)
    out = np.zeros(arr.shape, np.uint8)
    if hi > lo:
        for b in blocks:
            out[b] = np.round((convert(arr[b]).astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out


def _file_window(ds) -> tuple[float, float] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
    return first(ds.WindowCenter), first(ds.WindowWidth)


def _gray(arr: np.ndarray, ds, config: DicomConfig) -> np.ndarray:
    """Grey stored values -> (H, W) uint8: modality LUT (slope/intercept: stored -> e.g. Hounsfield), then the
    configured window, the file's window, its VOI LUT, or the image's own min-max."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    cw = config.center_width() or _file_window(ds)
    if cw is not None:
        out = np.empty(arr.shape, np.uint8)
        for b in _row_blocks(arr):
            out[b] = _window(apply_modality_lut(arr[b], ds).astype(np.float64), *cw)
    elif "VOILUTSequence" in ds:
        out = _minmax_blocks(arr, lambda a: apply_voi_lut(a, ds))
    else:
        out = _minmax_blocks(arr, lambda a: apply_modality_lut(a, ds))
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":  # low values are white
        np.subtract(255, out, out=out)
    return out


def decode_dicom(data: bytes, channels: int = 3, config: DicomConfig | None = None,
                 budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode DICOM bytes to (H, W, channels) uint8.

    Args:
        data: the bytes of a DICOM Part 10 file (a `.dcm` file, an upload) or of a raw dataset without
            preamble and file meta.
        channels: 3 (RGB) or 1 (grayscale).
        config: window and frame; default: the file's own VOI LUT/window, single-frame only.
        budget: what the decode may hold (default: the data layer's, `DecodeBudget.for_data()`).

    Raises:
        DicomDecodeError: unreadable, multi-frame without a frame, a codec that is not installed, a malformed
            element (named).
        DicomTooLarge: over the budget (pixels, stored bytes, inflated size), refused before decoding.
    """
    try:
        return _decode(data, channels, config or DicomConfig(), budget or DecodeBudget.for_data())
    except (DicomDecodeError, MemoryError):
        raise
    except Exception as e:  # pydicom and its plugins raise many types on corrupt files; the user needs one
        raise DicomDecodeError(f"unreadable DICOM file ({type(e).__name__}: {' '.join(str(e).split())[:200]}): the "
                               "file is corrupt or violates the DICOM standard; re-export it") from None


def _decode(data: bytes, channels: int, config: DicomConfig, budget: DecodeBudget) -> np.ndarray:
    ds = read_dataset(data, budget)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        kind = str(ds.get("Modality", "") or "").strip()
        raise DicomDecodeError(f"DICOM file without pixel data ({kind + ', ' if kind else ''}e.g. a structured "
                               "report or an RT plan): not an image; remove it from the image folder")
    arr = _stored_pixels(ds, config.frame, budget)
    if arr.ndim == 3:  # colour (RGB; pydicom converts YBR to RGB): already display values
        rgb = arr.astype(np.uint8) if arr.dtype == np.uint8 else _minmax_blocks(arr, lambda a: a)
        if channels == 1:
            weights = np.array([0.299, 0.587, 0.114], np.float32)
            return np.round(rgb.astype(np.float32) @ weights).astype(np.uint8)[..., None]
        return rgb
    gray = _gray(arr, ds, config)
    return gray[..., None] if channels == 1 else np.repeat(gray[..., None], 3, axis=2)
