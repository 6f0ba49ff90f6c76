"""Decoders bounded by what they really cost: issue 22's hostile files (generated here) are refused before a
decoder spends memory or time on them, in the data layer and as a training folder's bad images."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from datamodules import ImageDataModule
from datamodules.cache import ImageCache
from datamodules.decode_limits import (
    MAX_JPEG_SCANS,
    DecodeTimeout,
    call_with_time_limit,
    codestream_size,
    inflate_capped,
    jpeg_scan_count,
)
from datamodules.images import ImageDecodeError, decode
from errors import DataError
from tests.datamodules import hostile
from tests.datamodules.measure import measure
from tests.datamodules.test_inputs import make_folder

# name -> (file, words of the refusal)
HOSTILE = {
    "deflated.dcm": (lambda: hostile.deflated_dicom(1 << 30), "Deflated Explicit VR Little Endian: deflated dataset "
                                                              "inflates to more than"),
    "rle_rgb32.dcm": (lambda: hostile.rle_dicom(), "one frame holds 431,280,000 bytes of pixels (5990x6000, 3 "
                                                   "sample(s) of 32 bits), over the decode budget"),
    "tile.tif": (lambda: hostile.tiff_tile_bomb(), "TIFF tiles of 32768x32768 pixels for a 100x100 image"),
    "progressive.jpg": (lambda: hostile.progressive_jpeg_bomb(repeats=10_000), "JPEG with 10006 scans, over the "
                                                                               f"limit of {MAX_JPEG_SCANS}"),
}


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, (make, _) in HOSTILE.items():
        (folder / name).write_bytes(make())
    return folder


def test_hostile_files_are_small(hostile_files):
    sizes = {p.name: p.stat().st_size for p in hostile_files.iterdir()}
    assert all(size < 7 * 2**20 for size in sizes.values()), sizes  # the table's 1.06 / 6.7 / 1.04 / 0.96 MB


def test_hostile_files_are_refused_before_decoding(hostile_files):
    """Today's main: +2 GiB (deflate), +2.8 GiB (RLE), +1 GiB (TIFF tile), 43 s (JPEG scans). Each is now
    refused in a fresh process with under 64 MiB of peak RSS growth and well under a second."""
    records = {p.rsplit("/", 1)[-1]: r for r in measure(sorted(hostile_files.iterdir())) for p in [r["path"]]}
    for name, (_, words) in HOSTILE.items():
        record = records[name]
        assert record["outcome"] == "ImageDecodeError" and words in record["reason"], record
        assert record["peak_mib"] < 64 and record["cpu"] < 2.0, record


def test_hostile_files_in_a_training_folder_are_bad_images(tmp_path, hostile_files):
    root = make_folder(tmp_path / "data", per_class=4)
    for k, p in enumerate(sorted(hostile_files.iterdir())):
        (root / ("benign", "malignant")[k % 2] / p.name).write_bytes(p.read_bytes())
    dm = ImageDataModule(source=str(root), classes=["benign", "malignant"], image_size=16, num_workers=0,
                         artifacts_dir=str(tmp_path / "a"))
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "4 unusable input(s)" in msg and "on_bad_image: skip" in msg
    for name, (_, words) in HOSTILE.items():
        assert f"{name}: " in msg and words in msg, name


def test_a_decode_past_the_time_limit_is_a_bad_image(tmp_path):
    rng = np.random.default_rng(0)
    slow = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (1500, 1500, 3), dtype=np.uint8)).save(slow)  # ~50 ms to decode
    cache = ImageCache(tmp_path / "cache", (16, 16), time_limit_s=0.001)
    _, slots, bad = cache.resolve([str(slow)])
    assert slots[0] == -1 and bad[str(slow)].startswith("decoding took longer than 0.001 s, the limit per image")
    _, slots, bad = ImageCache(tmp_path / "cache2", (16, 16)).resolve([str(slow)])
    assert slots[0] == 0 and not bad


def test_call_with_time_limit_returns_raises_and_abandons():
    assert call_with_time_limit(lambda x: x + 1, 1.0, 41) == 42
    with pytest.raises(ZeroDivisionError):
        call_with_time_limit(lambda: 1 / 0, 1.0)
    t0 = time.perf_counter()
    with pytest.raises(DecodeTimeout, match="longer than 0.05 s"):
        call_with_time_limit(time.sleep, 0.05, 2.0)
    assert time.perf_counter() - t0 < 1.0


def test_an_ordinary_progressive_jpeg_and_tiled_tiff_still_decode():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, "JPEG", progressive=True)
    assert 2 <= jpeg_scan_count(buf.getvalue()) <= 12
    assert decode(buf.getvalue()).shape == (200, 300, 3)
    tiled = hostile.tiff_tile_bomb(100, 100, tile=256)  # one 256 x 256 tile around a 100 x 100 image
    assert decode(tiled, 1).shape == (100, 100, 1)


def test_a_tiff_whose_strip_size_is_not_a_number_is_refused_not_a_crash():
    """Found by the heavy fuzz: a damaged RowsPerStrip reached `int()` and raised ValueError, not ImageDecodeError."""
    buf = io.BytesIO()
    Image.new("L", (24, 16)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for at in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd : ifd + 2])[0], 12):
        if struct.unpack("<H", data[at : at + 2])[0] == 278:  # RowsPerStrip, rewritten as the FLOAT NaN
            data[at + 2 : at + 12] = struct.pack("<HI4s", 11, 1, struct.pack("<f", float("nan")))
    with pytest.raises(ImageDecodeError, match="TIFF tag 278 holds nan, not a whole number"):
        decode(bytes(data), 1)


def test_an_rle_frame_that_panics_its_rust_decoder_is_a_bad_image():
    """Found by the heavy fuzz: Rows 1 on a 16-row RLE frame makes pylibjpeg-rle panic (pyo3's PanicException
    is a BaseException, which `except Exception` let through the data layer and the server)."""
    data = bytearray(hostile.rle_dicom(16, 24, 1, 16))
    at = data.find(b"\x28\x00\x10\x00US\x02\x00") + 8  # (0028,0010) Rows, explicit VR US, 2 bytes
    data[at : at + 2] = (1).to_bytes(2, "little")
    with pytest.raises(ImageDecodeError, match="RLE Lossless pixel data cannot be decoded .*index out of bounds"):
        decode(bytes(data), 1)


def test_a_jpeg_with_one_scan_too_many_is_refused():
    buf = io.BytesIO()
    Image.new("L", (64, 64), 9).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    scans = jpeg_scan_count(data)
    last, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    at_limit = data[:eoi] + data[last:eoi] * (MAX_JPEG_SCANS - scans) + data[eoi:]
    assert jpeg_scan_count(at_limit) == MAX_JPEG_SCANS
    decode(at_limit)  # exactly at the limit: decoded
    over = data[:eoi] + data[last:eoi] * (MAX_JPEG_SCANS + 1 - scans) + data[eoi:]
    with pytest.raises(ImageDecodeError, match=f"JPEG with {MAX_JPEG_SCANS + 1} scans"):
        decode(over)


def test_inflate_capped_stops_at_the_limit():
    body = zlib.compress(bytes(10_000_000))[2:-4]  # raw deflate
    assert len(inflate_capped(body, 10_000_000)) == 10_000_000
    with pytest.raises(ValueError, match="inflates to more than 1,000,000 bytes"):
        inflate_capped(body, 1_000_000)
    assert len(inflate_capped(body, 1_000_000, partial=True)) == 1_000_000
    with pytest.raises(ValueError, match="not valid deflate data"):
        inflate_capped(b"\xff" * 100, 1000)


def test_deflated_dicom_without_padding_decodes():
    assert decode(hostile.deflated_dicom(padding=1000), 1).shape == (128, 128, 1)


def test_codestream_size_reads_jpeg_and_jpeg2000_headers():
    buf = io.BytesIO()
    Image.new("L", (70, 30)).save(buf, "JPEG")
    assert codestream_size(buf.getvalue()) == (70, 30)
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (1000).to_bytes(4, "big") + (500).to_bytes(4, "big") + bytes(8)
    assert codestream_size(siz + bytes(30)) == (1000, 500)
    assert codestream_size(b"\x00\x01\x02") is None
