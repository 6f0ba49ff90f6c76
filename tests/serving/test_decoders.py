"""The upload decode path within the server's budget: issue 22's hostile files are 413 before a decoder
allocates for them, and the largest DICOMs still accepted stay under the per-slot bound (max_pixels x 6 bytes)
now that DICOM decodes no longer queue behind one lock."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from serving.images import TooManyPixels, UnsupportedImage, decode_upload
from serving.limits import Limits
from tests.datamodules import hostile
from tests.datamodules.measure import measure
from tests.datamodules.test_decode_limits import HOSTILE

MAX_PIXELS = Limits().max_pixels
SLOT_BOUND_MIB = MAX_PIXELS * 6 / 2**20  # serving.limits: one decode stays under max_pixels x 6 bytes


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    for name, (make, _) in HOSTILE.items():
        (folder / name).write_bytes(make())
    # The largest DICOMs the budget accepts: 16-bit grey at the pixel limit, 8-bit RGB at two thirds of it.
    (folder / "ok_grey16.dcm").write_bytes(hostile.rle_dicom(6000, 5990, 1, 16))
    (folder / "ok_rgb8.dcm").write_bytes(hostile.rle_dicom(4896, 4896, 3, 8))
    return folder


def test_hostile_uploads_are_413_within_budget_and_the_largest_accepted_dicoms_fit_a_slot(uploads):
    records = {r["path"].rsplit("/", 1)[-1]: r for r in measure(sorted(uploads.iterdir()), how="server")}
    for name, (_, words) in HOSTILE.items():
        record = records[name]
        assert record["outcome"] == "TooManyPixels" and words in record["reason"], record
        assert record["peak_mib"] < 64 and record["cpu"] < 2.0, record
    for name in ("ok_grey16.dcm", "ok_rgb8.dcm"):
        record = records[name]
        assert record["outcome"] == "decoded" and record["peak_mib"] < SLOT_BOUND_MIB, record
        assert record["cpu"] < 10, record


def test_rgb_dicom_over_the_byte_budget_is_413_before_decoding():
    with pytest.raises(TooManyPixels, match=r"one frame holds 107,820,000 bytes .* over the decode budget of "
                                            r"72,000,000 bytes"):
        decode_upload(hostile.rle_dicom(6000, 5990, 3, 8), 3, (32, 32), "squash", MAX_PIXELS)


def test_raw_dicom_dataset_upload_is_read_as_dicom():
    ds = hostile.image_dataset(20, 30)
    ds.PixelData = (np.arange(600, dtype=np.uint16) * 7).tobytes()
    part10 = hostile.part10(ds, pydicom.uid.ExplicitVRLittleEndian)
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    write_dataset(raw, pydicom.dcmread(io.BytesIO(part10)))
    a = decode_upload(raw.getvalue(), 1, (16, 16), "squash", MAX_PIXELS)
    b = decode_upload(io.BytesIO(part10), 1, (16, 16), "squash", MAX_PIXELS)
    assert a.shape == (16, 16, 1) and a.std() > 0
    np.testing.assert_array_equal(a, b)


def test_bytes_that_only_start_like_a_raw_dataset_are_415():
    with pytest.raises(UnsupportedImage, match="not an image this server reads"):
        decode_upload(b"\x08\x00" + bytes(range(256)) * 4, 3, (16, 16), "squash", MAX_PIXELS)


def test_hostile_uploads_are_answered_413(client, uploads):
    for name in HOSTILE:
        response = client.post("/predict", files={"file": (name, (uploads / name).read_bytes())})
        assert response.status_code == 413, (name, response.text)
