"""Small files that cost a naive decoder gigabytes or minutes (issue 22's table), written in the test.

Each is built by streaming (deflate of zeros chunk by chunk, RLE runs written by hand), so making them costs
megabytes, not the gigabytes they claim.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

MIB = 1 << 20


def image_dataset(rows: int, cols: int, samples: int = 1, bits: int = 16) -> Dataset:
    """A secondary-capture image dataset without pixel data (the caller adds it)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.PatientID, ds.Modality = "HOSTILE", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    return ds


def part10(ds: Dataset, syntax, body: bytes | None = None) -> bytes:
    """Preamble, "DICM", file meta for `syntax`, then `body` (default: `ds` written explicit VR LE)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = generate_uid()
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    if body is None:
        ds_out = io.BytesIO()
        write_dataset(_explicit_le(ds_out), ds)
        body = ds_out.getvalue()
    out.write(body)
    return out.getvalue()


def _explicit_le(fp):
    from pydicom.filebase import DicomFileLike

    f = DicomFileLike(fp)
    f.is_little_endian, f.is_implicit_VR = True, False
    return f


def _deflate_zeros(prefix: bytes, zeros: int) -> bytes:
    """Raw deflate of `prefix` then `zeros` zero bytes, in well under a second for gigabytes: one MiB of zeros
    is compressed once and its blocks repeated (a full flush makes them independent of what came before)."""
    first = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    mib = block.compress(bytes(MIB)) + block.flush(zlib.Z_FULL_FLUSH)
    head = first.compress(prefix) + first.flush(zlib.Z_FULL_FLUSH)
    return head + mib * (zeros // MIB) + last.compress(bytes(zeros % MIB)) + last.flush()


def _zlib_zeros(zeros: int) -> bytes:
    """The zlib stream (header, raw deflate, Adler-32) of `zeros` zero bytes."""
    checksum = 1
    for _ in range(zeros // MIB):
        checksum = zlib.adler32(bytes(MIB), checksum)
    checksum = zlib.adler32(bytes(zeros % MIB), checksum)
    return b"\x78\xda" + _deflate_zeros(b"", zeros) + struct.pack(">I", checksum)


def deflated_dicom(padding: int = 1 << 30, side: int = 128) -> bytes:
    """A deflated DICOM: a side x side 16-bit image, then `padding` zero bytes of Data Set Trailing Padding
    (FFFC,FFFC): ~1 MB on disk per GiB inflated."""
    ds = image_dataset(side, side)
    ds.PixelData = (np.arange(side * side, dtype=np.uint16) % 4096).tobytes()
    plain = io.BytesIO()
    write_dataset(_explicit_le(plain), ds)
    trailer = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, padding)
    return part10(ds, DeflatedExplicitVRLittleEndian, _deflate_zeros(plain.getvalue() + trailer, padding))


def _rle_segment(length: int, value: int) -> bytes:
    """One RLE segment of `length` bytes equal to `value` (PackBits: 128-byte replicate runs)."""
    full, rest = divmod(length, 128)
    run = bytes([257 - 128, value])
    tail = bytes([257 - rest, value]) if rest > 1 else (bytes([0, value]) if rest == 1 else b"")
    segment = run * full + tail
    return segment + (b"\0" if len(segment) % 2 else b"")


def rle_dicom(rows: int = 6000, cols: int = 5990, samples: int = 3, bits: int = 32) -> bytes:
    """RLE Lossless DICOM of one uniform frame: 6.7 MB for RGB 32-bit 5990 x 6000 (431 MB of pixels)."""
    ds = image_dataset(rows, cols, samples, bits)
    n_segments = samples * bits // 8
    segment = _rle_segment(rows * cols, 0x40)
    offsets = [64 + k * len(segment) for k in range(n_segments)]
    header = struct.pack("<16I", n_segments, *offsets, *([0] * (15 - n_segments)))
    ds.PixelData = encapsulate([header + segment * n_segments])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return part10(ds, RLELossless)


def tiff_tile_bomb(width: int = 100, height: int = 100, tile: int = 32768) -> bytes:
    """A deflate-compressed grey TIFF whose one tile claims tile x tile pixels: ~1 MB for 1 GiB."""
    data = _zlib_zeros(tile * tile)
    tags = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, len(data))]
    ifd_at = 8 + len(data)
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value if tag != 324 else 8) if kind == 4
                       else struct.pack("<HHIHH", tag, kind, 1, value, 0) for tag, kind, value in tags)
    return b"II*\0" + struct.pack("<I", ifd_at) + data + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0"


def progressive_jpeg_bomb(side: int = 6000, repeats: int = 10_000) -> bytes:
    """A progressive grey JPEG whose last scan is repeated `repeats` times: under 1 MB, minutes of decoding."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last_sos = data.rfind(b"\xff\xda")
    eoi = data.rfind(b"\xff\xd9")
    return data[:eoi] + data[last_sos:eoi] * repeats + data[eoi:]
