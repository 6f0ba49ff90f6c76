"""Fuzzing the decoders (issue 22, item 4): random and mutated PNG, JPEG, TIFF, BMP and DICOM files, with header
fields pushed around the limits, through the data layer (`decode`) and the server (`decode_upload`). Each is
answered with an image or the decoder's own error type, within its time and memory budget; never another
exception, never a crash.

The default profile is a bounded, derandomised number of examples (a few seconds); `-m slow` runs a heavier one.
"""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from datamodules.images import ImageDecodeError, decode
from serving.images import decode_upload
from tests.datamodules import hostile

BUDGET_PIXELS = 1_000_000  # PIL's limit and the server's max_pixels during the fuzz
MEMORY_MIB = 160  # peak RSS growth allowed per decode at that budget (1 MP x a few copies, plus the libraries)
SECONDS = 2.0


def _pil(mode: str, fmt: str, size=(24, 16), **kw) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    arr = rng.integers(0, 255 if mode != "I;16" else 4095, (size[1], size[0], 3 if mode == "RGB" else 1))
    img = Image.fromarray(arr.astype(np.uint8 if mode != "I;16" else np.uint16).squeeze(-1) if mode != "RGB"
                          else arr.astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _dicom(syntax=ExplicitVRLittleEndian) -> bytes:
    if syntax == RLELossless:
        return hostile.rle_dicom(16, 24, 1, 16)
    ds = hostile.image_dataset(16, 24)
    ds.PixelData = (np.arange(16 * 24, dtype=np.uint16) * 11).tobytes()
    return hostile.part10(ds, syntax)


SEEDS = {
    "png": _pil("L", "PNG"), "png16": _pil("I;16", "PNG"), "jpeg": _pil("RGB", "JPEG"),
    "progressive": _pil("RGB", "JPEG", progressive=True), "bmp": _pil("RGB", "BMP"), "tiff": _pil("L", "TIFF"),
    "tiff_deflate": _pil("RGB", "TIFF", compression="tiff_adobe_deflate"),
    "tiff_tiled": hostile.tiff_tile_bomb(24, 16, tile=32), "dicom": _dicom(), "dicom_rle": _dicom(RLELossless),
    "dicom_deflated": hostile.deflated_dicom(padding=64, side=16),
}
# Values around the limits for 16- and 32-bit header fields (sizes, tile sizes, counts, offsets).
EDGES = [0, 1, 2, 255, 256, 999, 1000, 1001, 4095, 4096, 32767, 32768, 65535, 2**20, 2**24, 2**31 - 1, 2**32 - 1]


def _header_fields(data: bytes) -> list[int]:
    """Offsets of integer fields worth pushing: every position in the header, plus the DICOM image elements."""
    offsets = list(range(0, min(len(data), 400), 2))
    for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00", b"\x28\x00\x00\x01", b"\x28\x00\x02\x00"):
        at = data.find(tag)  # Rows, Columns, BitsAllocated, SamplesPerPixel: value after tag, VR, length
        if at >= 0:
            offsets.append(at + 8)
    return offsets


@st.composite
def mutated(draw) -> bytes:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["edge16", "edge32", "byte", "truncate", "insert"]))
        at = draw(st.sampled_from(_header_fields(bytes(data)))) if kind.startswith("edge") else \
            draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "edge16" and at + 2 <= len(data):
            data[at : at + 2] = struct.pack(draw(st.sampled_from(["<H", ">H"])), draw(st.sampled_from(EDGES)) & 0xFFFF)
        elif kind == "edge32" and at + 4 <= len(data):
            data[at : at + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), draw(st.sampled_from(EDGES)))
        elif kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


ANY_BYTES = st.one_of(mutated(), st.binary(max_size=512))


PROC = Path("/proc/self/clear_refs").exists()  # Linux: peak RSS resettable per decode


def _peak_kib() -> int:
    if not PROC:
        return 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _within_budget(call) -> None:
    """`call()` returns an image or raises ImageDecodeError, within SECONDS of CPU and MEMORY_MIB of RSS growth."""
    if PROC:
        Path("/proc/self/clear_refs").write_text("5")
    before = _peak_kib()
    t0 = time.process_time()  # CPU time of every thread: a loaded machine stretches wall time, not this
    try:
        out = call()
        assert out.dtype == np.uint8 and out.ndim == 3
    except ImageDecodeError:
        pass
    assert time.process_time() - t0 < SECONDS
    assert (_peak_kib() - before) / 1024 < MEMORY_MIB


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BUDGET_PIXELS // 2)  # PIL refuses above 2x this


def _check(data: bytes) -> None:
    _within_budget(lambda: decode(data, 1))
    _within_budget(lambda: decode_upload(data, 3, (16, 16), "squash", BUDGET_PIXELS))


FAST = settings(max_examples=150, deadline=10_000,  # wall time, generous for a shared machine
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FAST
@given(data=ANY_BYTES)
def test_decoders_answer_mutated_files_within_budget(data):
    _check(data)


@pytest.mark.slow
@settings(FAST, max_examples=5000, derandomize=False)
@given(data=ANY_BYTES)
def test_decoders_answer_mutated_files_within_budget_heavy(data):
    _check(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes(name):
    assert decode(SEEDS[name], 1).ndim == 3
