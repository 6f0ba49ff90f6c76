"""DICOM to pixels with pydicom: the modality LUT (rescale slope/intercept), a window (configured, or the
file's VOI LUT / window, or the image's own range), MONOCHROME1 inversion, one frame.

Stored values stay 16-bit (then float, in modality units such as Hounsfield) until the window maps them to
8 bits, so a CT lung window keeps its full precision. `decode_dicom` takes *bytes*: the training cache,
`cli.py predict` and the web server all decode uploads the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

# (center, width) in modality units (Hounsfield for CT); the usual radiology presets.
WINDOW_PRESETS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
# Transfer syntaxes pydicom decodes only with a plugin, and the pip packages that provide one.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
}


class DicomDecodeError(ValueError):
    """A DICOM file that cannot become one 2-D image; the message says what to do."""


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


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _read(data: bytes, pixels: bool = True):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as e:
        raise DicomDecodeError(f"unreadable DICOM file ({e or type(e).__name__})") from None


def dicom_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the DICOM header only, without decoding the pixels."""
    ds = _read(data, pixels=False)
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomDecodeError("DICOM file without image (no Rows/Columns): not an image object")
    return int(ds.Columns), int(ds.Rows)


def dicom_patient_id(data: bytes) -> str | None:
    """The PatientID of a DICOM header (None when absent or empty)."""
    value = str(_read(data, pixels=False).get("PatientID", "") or "").strip()
    return value or None


def _stored_pixels(ds, frame: int | None) -> np.ndarray:
    """Stored values of one frame, (H, W) or (H, W, 3), still in their own bit depth."""
    syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and frame is None:
        raise DicomDecodeError(f"multi-frame DICOM ({frames} frames) is not a single image: set data.dicom.frame to "
                               "the frame to use (0-based), or export one file per slice")
    if frame is not None and not 0 <= frame < frames:
        raise DicomDecodeError(f"data.dicom.frame {frame} is outside this file's {frames} frame(s)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError by plugin
        package = _DECODER_PACKAGES.get(syntax)
        if package is not None:
            raise DicomDecodeError(f"compressed DICOM ({ds.file_meta.TransferSyntaxUID.name}) needs a decoder that "
                                   f"is not installed: pip install {package}") from None
        raise DicomDecodeError(f"cannot decode DICOM pixel data: {e}") from None
    return arr[frame] if frames > 1 else arr


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window of DICOM PS3.3 C.11.2.1.2.1 to 0..255."""
    lo = center - 0.5 - (width - 1) / 2
    scaled = (values - lo) / max(width - 1, 1e-6)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def decode_dicom(data: bytes, channels: int = 3, config: DicomConfig | None = None) -> np.ndarray:
    """Decode DICOM bytes to (H, W, channels) uint8.

    Args:
        data: the bytes of a DICOM Part 10 file (a `.dcm` file, an upload).
        channels: 3 (RGB) or 1 (grayscale).
        config: window and frame; default: the file's own VOI LUT/window, single-frame only.

    Raises:
        DicomDecodeError: unreadable, multi-frame without a frame, or a codec that is not installed.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    config = config or DicomConfig()
    ds = _read(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DicomDecodeError("DICOM file without pixel data (e.g. a structured report): not an image")
    arr = _stored_pixels(ds, config.frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # colour (RGB; pydicom converts YBR to RGB): already display values
        gray = None
        rgb = arr.astype(np.uint8) if arr.dtype == np.uint8 else _minmax(arr.astype(np.float64))
    else:
        values = apply_modality_lut(arr, ds).astype(np.float64)  # slope/intercept: stored -> e.g. Hounsfield
        cw = config.center_width()
        if cw is None and "WindowCenter" in ds and "WindowWidth" in ds:
            first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
            cw = first(ds.WindowCenter), first(ds.WindowWidth)
        if cw is not None:
            gray = _window(values, *cw)
        elif "VOILUTSequence" in ds:
            gray = _minmax(apply_voi_lut(arr, ds).astype(np.float64))
        else:
            gray = _minmax(values)
        if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
            gray = 255 - gray
        rgb = None
    if gray is not None:
        return gray[..., None] if channels == 1 else np.repeat(gray[..., None], 3, axis=2)
    if channels == 1:
        return np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)[..., None]
    return rgb
