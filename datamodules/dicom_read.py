"""DICOM bytes -> a pydicom dataset and the stored pixels of one frame, within the decode budget.

What hospitals export: Part 10 files (preamble, "DICM", file meta), raw datasets without them (older
archives), every transfer syntax pydicom decodes with the pylibjpeg plugins (JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, RLE, deflate). What is refused, before anything large is allocated: a deflated dataset
that inflates past its image, a frame whose stored bytes pass the budget, a compressed frame whose codestream
declares more pixels than the header. Every refusal names the element or transfer syntax and what to do.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Sequence

from datamodules.decode_limits import DecodeBudget, codestream_size, inflate_capped

# Transfer syntaxes pydicom decodes only with a plugin: the importable module and the pip packages.
_PLUGIN = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
                    ("libjpeg", "pylibjpeg pylibjpeg-libjpeg")),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                     "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
                    ("openjpeg", "pylibjpeg pylibjpeg-openjpeg")),
    "1.2.840.10008.1.2.5": ("rle", "pylibjpeg pylibjpeg-rle"),
}
_DEFLATED = "1.2.840.10008.1.2.1.99"
_RLE = "1.2.840.10008.1.2.5"
# A deflated dataset's elements before the pixels (patient, study, private headers) fit well inside this;
# past it without reaching Rows/Columns, the file is refused rather than inflated further.
MAX_HEADER_BYTES = 16 << 20
# The image elements read before decoding; a malformed value in one of them is named in the refusal.
_IMAGE_ELEMENTS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                   "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation", "PlanarConfiguration",
                   "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


class DicomDecodeError(ValueError):
    """A DICOM file that cannot become one 2-D image; the message says what to do."""


class NotDicom(DicomDecodeError):
    """Bytes that start like a raw DICOM dataset but are not one (the server answers 415, as for any format
    it does not read)."""


class DicomTooLarge(DicomDecodeError):
    """A DICOM file whose pixels (declared or inflated) pass the decode budget (the server answers 413)."""


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_raw_dicom(data: bytes) -> bool:
    """A DICOM dataset without preamble and file meta: it starts with a group 0002 or 0008 element, little or
    big endian (no PNG, JPEG, BMP or TIFF starts so)."""
    return len(data) >= 8 and data[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08", b"\x00\x02")


def looks_like_dicom(data: bytes) -> bool:
    return is_dicom(data) or is_raw_dicom(data)


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword) or 0
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


def _geometry_probe(prefix: bytes) -> tuple[int, int] | None:
    """(header bytes, pixel bytes of all frames) from the start of an inflated dataset, once Rows and Columns
    are in it; None while they are not."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(prefix), force=True, stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        per_sample = math.ceil(int(ds.get("BitsAllocated", 16) or 16) / 8)
        frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception:  # a prefix cut inside an element, or Rows not reached yet
        return None
    return len(prefix), rows * cols * samples * per_sample * frames


def _inflate(body: bytes, budget: DecodeBudget) -> bytes:
    """The inflated dataset of a deflated file, never more than its header plus its declared pixels (and
    never more than the decode budget)."""
    probe_at = 1 << 20
    while True:
        try:
            head = inflate_capped(body, probe_at, partial=True)
        except ValueError as e:
            raise DicomDecodeError(f"transfer syntax Deflated Explicit VR Little Endian: {e}; re-export the "
                                   "file uncompressed or with another transfer syntax") from None
        found = _geometry_probe(head)
        if found is not None or len(head) < probe_at:
            break
        if probe_at >= MAX_HEADER_BYTES:
            raise DicomTooLarge(f"deflated DICOM without (0028,0010) Rows / (0028,0011) Columns in its first "
                                f"{MAX_HEADER_BYTES >> 20} MiB: not inflated further; re-export it uncompressed")
        probe_at *= 2
    cap = budget.max_bytes if found is None else min(budget.max_bytes, found[0] + found[1] + (1 << 20))
    try:
        return inflate_capped(body, cap)
    except ValueError as e:
        raise DicomTooLarge(f"transfer syntax Deflated Explicit VR Little Endian: {e} (its header and pixels "
                            "need less; the rest is padding): re-export the file") from None


def _undeflated(data: bytes, budget: DecodeBudget) -> bytes:
    """A Part 10 file with a deflated dataset rewritten as Explicit VR Little Endian, inflated within budget
    (pydicom itself inflates the whole dataset with one `zlib.decompress` before any check)."""
    from pydicom.filereader import _read_file_meta_info  # the file meta alone: no public reader takes bytes
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    fp = io.BytesIO(data)
    fp.seek(132)
    try:
        meta = _read_file_meta_info(fp)
    except Exception as e:
        raise DicomDecodeError(f"unreadable DICOM file meta ({e or type(e).__name__})") from None
    if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
        return data
    body = _inflate(data[fp.tell():], budget)
    out = io.BytesIO()
    out.write(data[:132])
    try:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        write_file_meta_info(out, meta, enforce_standard=False)
    except Exception as e:  # a malformed meta element pydicom cannot write back
        raise DicomDecodeError(f"unreadable DICOM file meta ({type(e).__name__}: {e}): re-export the file") from None
    out.write(body)
    return out.getvalue()


def _known_elements(ds) -> bool:
    """True when a dataset read with `force=True` holds standard elements (pydicom reads any bytes as some
    dataset; a real one has e.g. SOP Class UID, Modality, Rows)."""
    from pydicom.datadict import dictionary_has_tag

    try:
        return sum(1 for tag in ds.keys() if dictionary_has_tag(tag)) >= 2
    except Exception:
        return False


def _raw_syntax(ds) -> None:
    """Give a dataset read without file meta the transfer syntax its encoding implies (pydicom found it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def read_dataset(data: bytes, budget: DecodeBudget, pixels: bool = True):
    """The pydicom dataset of a Part 10 file or a raw dataset, deflate undone within budget.

    Raises:
        DicomDecodeError: unreadable, or (raw) not a DICOM dataset.
        DicomTooLarge: a deflated dataset past its image and the budget.
    """
    import pydicom

    raw = not is_dicom(data)
    if not raw:
        data = _undeflated(data, budget)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=raw, stop_before_pixels=not pixels)
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, ValueError, KeyError, struct.error, ...
        raise DicomDecodeError(f"unreadable DICOM file ({e or type(e).__name__}): the file is truncated or "
                               "corrupt; re-export it") from None
    if raw:
        if not _known_elements(ds):
            raise NotDicom("not a readable image: no DICOM preamble/\"DICM\", and read as a raw DICOM "
                                   "dataset its elements are not DICOM ones (unknown or corrupt format)")
        _raw_syntax(ds)
    return ds


def _as_numbers(elem) -> None:
    """Convert a numeric element's value(s) as decoding will; pydicom keeps a malformed IS/DS as text."""
    convert = {"IS": int, "US": int, "SS": int, "UL": int, "SL": int, "DS": float}.get(str(elem.VR))
    value = elem.value
    if convert is None or value is None:
        return
    for item in [value] if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) else value:
        if item is not None and item != "":
            convert(item)


def check_elements(ds) -> None:
    """Read every image element once, so a value that violates its VR (e.g. IS "1A") is named here rather
    than surfacing as Python's own `int()` error in the middle of decoding."""
    for keyword in _IMAGE_ELEMENTS:
        if keyword not in ds:
            continue
        try:
            _as_numbers(ds[keyword])  # also converts the raw element, raising on a malformed value
        except Exception:
            raw = ds.get_item(keyword)
            value = raw.value if raw is not None else "?"
            value = bytes(value).decode("latin-1").strip() if isinstance(value, (bytes, bytearray)) else str(value)
            raise DicomDecodeError(f"element {_tag(keyword)} holds {value!r}, which violates the DICOM standard "
                                   f"(VR {getattr(raw, 'VR', None) or '?'}): correct the element or re-export the "
                                   "file") from None


def frame_geometry(ds, budget: DecodeBudget) -> tuple[int, int, int]:
    """(rows, columns, frames) after checking that one frame's stored bytes fit the budget.

    Raises:
        DicomDecodeError: a required element is missing.
        DicomTooLarge: over `max_pixels`, or one frame's stored bytes over the byte budget.
    """
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise DicomDecodeError(f"DICOM image without the required element {_tag(keyword)}: the file violates "
                                   "the DICOM standard; re-export it")
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    if rows * cols > budget.max_pixels:
        raise DicomTooLarge(f"image has {cols}x{rows} pixels, over the limit of {budget.max_pixels}")
    stored = rows * cols * samples * math.ceil(bits / 8)
    if stored > budget.max_bytes:
        raise DicomTooLarge(f"one frame holds {stored:,} bytes of pixels ({cols}x{rows}, {samples} sample(s) of "
                            f"{bits} bits), over the decode budget of {budget.max_bytes:,} bytes")
    return rows, cols, max(int(ds.get("NumberOfFrames", 1) or 1), 1)


def check_codestream(ds, index: int, frames: int, rows: int, cols: int) -> None:
    """Refuse an encapsulated frame whose own codestream declares more pixels than Rows x Columns, before
    the decoder allocates for them."""
    from pydicom.encaps import get_frame

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated:
        return
    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception:
        return  # the decoder reports a broken encapsulation in its own words
    size = codestream_size(bytes(frame[:1 << 16]))
    if size is not None and size[0] * size[1] > rows * cols:
        raise DicomTooLarge(f"the {ds.file_meta.TransferSyntaxUID.name} frame declares {size[0]}x{size[1]} pixels, "
                            f"more than the header's (0028,0011) Columns x (0028,0010) Rows of {cols}x{rows}: "
                            "the file is inconsistent; re-export it")


def _has_decoder(syntax) -> bool:
    from pydicom.pixels import get_decoder

    try:
        get_decoder(syntax)
    except NotImplementedError:
        return False
    return True


def _is_panic(e: BaseException) -> bool:
    """pylibjpeg-rle is Rust: on some corrupt RLE segments it panics (the heavy fuzz found an index out of
    bounds), and pyo3 raises `pyo3_runtime.PanicException`, a BaseException so that `except Exception` does
    not swallow it. That module exists only once a pyo3 extension is loaded, hence the name test."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


def decode_frame(ds, index: int | None):
    """Stored values of one frame (or the only one), decoded by the plugin the transfer syntax needs.

    Raises:
        DicomDecodeError: a decoder is not installed, or the pixel data is corrupt or truncated.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise DicomDecodeError("file meta without (0002,0010) Transfer Syntax UID: the file violates the DICOM "
                               "standard and its pixels cannot be interpreted; re-export it")
    if not _has_decoder(syntax):
        raise DicomDecodeError(f"transfer syntax {syntax.name} ({syntax}) has no image decoder (video, JPIP, JPEG 2000 "
                               "Part 2 or a private syntax): export the images uncompressed, JPEG, JPEG-LS, JPEG "
                               "2000 or RLE")
    module, package = _PLUGIN.get(str(syntax), (None, None))
    installed = _installed(module)
    # RLE: pydicom's own decoder expands each segment without a bound; pylibjpeg-rle stops at Rows x Columns.
    plugin = "pylibjpeg" if str(syntax) == _RLE and installed else ""
    try:
        ds.pixel_array_options(index=index, decoding_plugin=plugin)
        return ds.pixel_array
    except BaseException as e:  # pydicom raises RuntimeError/NotImplementedError/ValueError/AttributeError by plugin
        if not isinstance(e, Exception) and not _is_panic(e):
            raise  # KeyboardInterrupt, SystemExit
        if not installed:
            raise DicomDecodeError(f"compressed DICOM ({syntax.name}) needs a decoder that is not installed: "
                                   f"pip install {package}") from None
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        if "less than expected" in reason:
            raise DicomDecodeError(f"truncated pixel data ({reason}): re-export the file") from None
        raise DicomDecodeError(f"the {syntax.name} pixel data cannot be decoded ({reason}): the file is corrupt "
                               "or violates the standard; re-export it") from None
