"""Small uploads that cost a decoder far more than their size or header suggests (issue 22), generated in
memory in about a second each, for `tests/serving` and `bench_serve.py --hostile`.

- `repeated_scan_jpeg`: a progressive JPEG whose last AC scan is repeated thousands of times: every repeat
  makes the decoder walk every block again (CPU time).
- `tiled_tiff`: a 100 x 100 TIFF whose header claims one huge tile: the decoder allocates the tile.
- `deflated_dicom`: a small DICOM image in the deflated transfer syntax, padded with zeros that inflate
  1000-fold before any check can run.
- `rle_dicom`: an RLE-compressed RGB DICOM of 32-bit samples: each pixel costs 12 bytes and more once decoded.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a baseline/progressive JPEG, scans including their data."""
    out, i = [], 2
    while i < len(jpeg):
        marker = jpeg[i + 1]
        if marker == 0xD9:  # EOI
            out.append((marker, i, i + 2))
            break
        end = i + 2 + int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next marker that is not a stuffed 0 or RSTn
            while not (jpeg[end] == 0xFF and jpeg[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, i, end))
        i = end
    return out


def repeated_scan_jpeg(side: int = 6000, repeats: int = 10_000) -> bytes:
    """A grey progressive JPEG of side x side whose last AC refinement scan (and its Huffman table) is
    repeated `repeats` times: under 1 MB, and seconds to minutes of one core to decode."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segments = _segments(data)
    scans = [k for k, (marker, _, _) in enumerate(segments) if marker == 0xDA]
    last = scans[-1]
    first = last - 1 if segments[last - 1][0] == 0xC4 else last  # the scan's own DHT, when it has one
    block = data[segments[first][1] : segments[last][2]]
    return data[: segments[first][1]] + block * repeats + data[segments[last][2] :]


def tiled_tiff(width: int = 100, height: int = 100, tile: int = 32768, deflated_bytes: int = 2**30) -> bytes:
    """A grey TIFF of width x height whose one tile claims tile x tile pixels, its data `deflated_bytes`
    zeros deflate-compressed (about 1 MB for 1 GiB)."""
    data = _deflate_zeros(deflated_bytes, zlib_header=True)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
               (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, len(data))]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 324 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\x00\x00\x00\x00" + data


def _deflate_zeros(n: int, zlib_header: bool = False, prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """prefix + n zero bytes + suffix, deflate-compressed in 16 MiB blocks (never n bytes in memory)."""
    z = zlib.compressobj(6, zlib.DEFLATED, 15 if zlib_header else -15)
    out = [z.compress(prefix)]
    block = bytes(16 * 2**20)
    for start in range(0, n, len(block)):
        out.append(z.compress(block[: min(len(block), n - start)]))
    out.append(z.compress(suffix))
    out.append(z.flush())
    return b"".join(out)


def _dicom_parts(rows: int, columns: int, samples: int, bits: int, syntax: str) -> tuple[bytes, bytes]:
    """(preamble + file meta, the data set without pixel data) of a minimal secondary-capture image, the data set
    in explicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OT", "HOSTILE"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element (OB/OW/UN with a 4-byte length, short VRs with 2)."""
    if vr in (b"OB", b"OW", b"UN"):
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def deflated_dicom(side: int = 128, padding: int = 2**30) -> bytes:
    """A side x side 8-bit grey DICOM in the deflated transfer syntax, with `padding` zero bytes in a private
    element before its pixels (about 1 MB per GiB of padding)."""
    head, body = _dicom_parts(side, side, 1, 8, "1.2.840.10008.1.2.1.99")
    creator = _element(0x7FDF, 0x0010, b"LO", b"PADDING ")
    pad_header = struct.pack("<HH", 0x7FDF, 0x1000) + b"OB\0\0" + struct.pack("<I", padding)
    pixels = _element(0x7FE0, 0x0010, b"OW", np.full((side, side), 100, np.uint8).tobytes())
    return head + _deflate_zeros(padding, prefix=body + creator + pad_header, suffix=pixels)


def _rle_segment(row: bytes, rows: int) -> bytes:
    """PackBits of `rows` identical rows (each row encoded on its own, as the DICOM RLE standard requires)."""
    runs = b""
    for start in range(0, len(row), 128):
        run = row[start : start + 128]
        runs += bytes([(257 - len(run)) & 0xFF, run[0]]) if len(run) > 1 else bytes([0, run[0]])
    segment = runs * rows
    return segment + b"\0" * (len(segment) % 2)


def rle_dicom(rows: int = 6000, columns: int = 5990, samples: int = 3, bits: int = 32) -> bytes:
    """An RLE Lossless DICOM of constant pixels: rows x columns x samples of `bits` bits (6.7 MB for the
    defaults, 36 megapixels of 12 bytes each once decoded)."""
    head, body = _dicom_parts(rows, columns, samples, bits, "1.2.840.10008.1.2.5")
    n = samples * bits // 8
    segments = [_rle_segment(bytes([7 * k + 1]) * columns, rows) for k in range(n)]
    offsets, at = [], 64
    for segment in segments:
        offsets.append(at)
        at += len(segment)
    frame = struct.pack("<16I", n, *offsets, *[0] * (15 - n)) + b"".join(segments)
    pixels = struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", 0xFFFFFFFF)
    return head + body + pixels + _encapsulated([frame])


def _encapsulated(frames: list[bytes]) -> bytes:
    """The items of an encapsulated Pixel Data value: an empty offset table, the frames, the delimiter."""
    out = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    for frame in frames:
        frame += b"\0" * (len(frame) % 2)
        out += struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
