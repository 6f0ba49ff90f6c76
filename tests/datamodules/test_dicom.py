"""DICOM input: small files written by pydicom in the test decode to the pixel values the standard implies."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from datamodules import dicom_read
from datamodules.datamodule import ImageDataModule
from datamodules.dicom import DicomConfig, decode_dicom
from datamodules.images import ImageDecodeError, decode, image_size_of
from errors import ConfigError, DataError


def dicom_bytes(pixels: np.ndarray, photometric="MONOCHROME2", slope=None, intercept=None, window=None,
                patient="P001", frames=None, syntax=ExplicitVRLittleEndian, data=None) -> bytes:
    """A minimal CT image (Part 10 file) holding `pixels` as stored values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if frames:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = data if data is not None else pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Stored CT values: with slope 1 / intercept -1024 they are -1024 (air), -600, 0 (water), 400, 2000 HU.
CT = np.array([[0, 424, 1024, 1424, 3024]] * 4, dtype=np.int16)


def window(hu, center, width):
    return np.round(np.clip((hu - (center - 0.5 - (width - 1) / 2)) / (width - 1), 0, 1) * 255).astype(np.uint8)


def test_ct_rescale_and_lung_window_give_the_expected_pixels():
    out = decode_dicom(dicom_bytes(CT, slope=1, intercept=-1024), channels=1, config=DicomConfig(window="lung"))
    hu = CT.astype(float) - 1024
    assert out.shape == (4, 5, 1)
    np.testing.assert_array_equal(out[..., 0], window(hu, -600, 1500))
    assert out[0, 0, 0] == 55 and out[0, 1, 0] == 128 and out[0, 4, 0] == 255  # -600 HU mid-grey, bone white


def test_slope_and_explicit_window_and_the_files_own_window():
    stored = np.array([[100, 500, 900]], dtype=np.uint16)  # slope 2, intercept -1000: -800, 0, 800 HU
    data = dicom_bytes(stored, slope=2, intercept=-1000, window=(0, 801))
    hu = stored.astype(float) * 2 - 1000
    np.testing.assert_array_equal(decode_dicom(data, 1)[..., 0], window(hu, 0, 801))  # the file's window
    custom = decode_dicom(data, 3, DicomConfig(window={"center": 400, "width": 801}))
    assert custom.shape == (1, 3, 3)
    np.testing.assert_array_equal(custom[..., 1], window(hu, 400, 801))


def test_monochrome1_is_inverted_and_16_bit_range_kept():
    stored = np.array([[0, 1000, 4095]], dtype=np.uint16)  # 12-bit values: an 8-bit cast would clip them
    out = decode_dicom(dicom_bytes(stored, photometric="MONOCHROME1"), 1)[0, :, 0]
    np.testing.assert_array_equal(out, [255, 255 - round(1000 * 255 / 4095), 0])


def test_multi_frame_is_rejected_unless_a_frame_is_chosen():
    frames = np.stack([np.full((2, 3), v, np.uint16) for v in (0, 500, 1000)])
    frames[:, 0, 0], frames[:, 0, 1] = 4000, 0  # every frame spans 0..4000
    data = dicom_bytes(frames, frames=3)
    with pytest.raises(ImageDecodeError, match=r"multi-frame DICOM \(3 frames\).*data.dicom.frame"):
        decode(data, 1)
    out = decode(data, 1, DicomConfig(frame=1))[..., 0]
    np.testing.assert_array_equal(out[0], [255, 0, round(500 * 255 / 4000)])
    assert (out[1] == round(500 * 255 / 4000)).all()


def test_compressed_without_decoder_names_the_package(monkeypatch):
    data = dicom_bytes(np.zeros((2, 2), np.uint16), syntax=JPEG2000, data=encapsulate([b"\xff\x4f" + b"\x00" * 30]))
    with pytest.raises(ImageDecodeError, match=r"JPEG 2000 .*pixel data cannot be decoded .*corrupt"):
        decode(data, 1)  # the plugin is a dependency: a broken codestream is called broken
    monkeypatch.setattr(dicom_read, "_installed", lambda module: False)
    with pytest.raises(ImageDecodeError, match="pip install pylibjpeg pylibjpeg-openjpeg"):
        decode(data, 1)


def test_header_size_without_decoding():
    assert image_size_of(dicom_bytes(CT)) == (5, 4, "DICOM")


def test_bad_window_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown preset 'lungs'"):
        ImageDataModule(dicom={"window": "lungs"})


def test_dcm_folder_uses_patient_id_and_trains_from_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("normal", "covid"):
        for i in range(10):
            (tmp_path / "d" / c).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 3000, (24, 24)).astype(np.int16)
            (tmp_path / "d" / c / f"{i}.dcm").write_bytes(dicom_bytes(pixels, slope=1, intercept=-1024,
                                                                      patient=f"{c}-{i // 2}"))
    dm = ImageDataModule(source=str(tmp_path / "d"), classes=["normal", "covid"], image_size=16, num_workers=0,
                         artifacts_dir=str(tmp_path / "a"), dicom={"window": "mediastinum"})
    frame = dm.resolve().frame
    assert frame.height == 20 and frame["patient_id"].n_unique() == 10
    per_patient = {p: set(s) for p, s in frame.group_by("patient_id").agg("split").iter_rows()}
    assert all(len(s) == 1 for s in per_patient.values())  # patients from PatientID keep their slices together
    dm.setup()
    image, _ = dm.datasets["train"][0]
    assert image.shape == (16, 16, 3)


def pydicom_test_files() -> list[Path]:
    """The DICOM files pydicom ships as its own test set (inside the installed package)."""
    from pydicom.data import get_testdata_file

    return sorted(Path(get_testdata_file("MR_small.dcm")).parent.rglob("*.dcm"))


def test_pydicom_test_files_as_a_folder_dataset(tmp_path):
    """pydicom's own test set as two classes: every file whose pixels the installed plugins decode is decoded,
    every other one refused with a specific reason (no "not installed" decoder among them)."""
    files = pydicom_test_files()
    assert len(files) == 79  # pydicom 3.0's shipped set (more are downloaded on demand; none here)
    for i, f in enumerate(files):
        (tmp_path / "d" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "d" / "ab"[i % 2] / f"{i:02d}_{f.name}")
    dm = ImageDataModule(source=str(tmp_path / "d"), classes=["a", "b"], image_size=16, num_workers=0,
                         artifacts_dir=str(tmp_path / "art"))
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    refused = dict(re.findall(r"^\s*- \S*?\d\d_(\S+\.dcm): (.*)$", str(err.value), re.M))
    assert len(refused) == 28 and len(files) - len(refused) == 51  # on main: the same 51, but see below
    reasons = list(refused.values())
    assert not any("not installed" in r for r in reasons)  # main called 2 corrupt files "needs a decoder"
    assert sum("multi-frame DICOM" in r and "data.dicom.frame" in r for r in reasons) == 7
    assert sum("without pixel data" in r for r in reasons) == 14  # SR, RT plan/struct, ECG, DICOMDIR, ...
    # Raw datasets without preamble/meta are read (force=True) and called what they are.
    for raw in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm"):
        assert refused[raw].startswith("DICOM file without pixel data (RT")
    assert "not a readable image" in refused["no_meta.dcm"]  # its first byte is stray: (0820,0500) is no element
    assert refused["badVR.dcm"].startswith("element (0028,0008) NumberOfFrames holds '1A', which violates the DICOM")
    assert refused["MR_truncated.dcm"].startswith("truncated pixel data")
    assert "(0028,0010) Rows" in refused["nested_priv_SQ.dcm"] and "(0028,0010) Rows" in refused["meta_missing_tsyntax.dcm"]
    assert "declares 3722445056x1024 pixels" in refused["JPEG2000-embedded-sequence-delimiter.dcm"]
    assert "JPEG Extended" in refused["JPEG-lossy.dcm"] and "corrupt" in refused["JPEG-lossy.dcm"]


MR_WINDOW = {"center": 600, "width": 900}  # MR_small's stored values span about 0..1300
TWINS = [("MR_small_RLE.dcm", "MR_small.dcm", MR_WINDOW), ("MR_small_jp2klossless.dcm", "MR_small.dcm", MR_WINDOW),
         ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", MR_WINDOW),
         ("MR_small_bigendian.dcm", "MR_small.dcm", MR_WINDOW), ("MR_small_implicit.dcm", "MR_small.dcm", MR_WINDOW),
         ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm", {"center": 1.0e6, "width": 4.0e5}),
         ("rtdose_expb_1frame.dcm", "rtdose_1frame.dcm", None), ("liver_expb_1frame.dcm", "liver_1frame.dcm", None)]


@pytest.mark.parametrize("compressed, plain, window", TWINS)
def test_compressed_variants_match_their_uncompressed_twins(compressed, plain, window):
    """Lossless compressed (and big-endian/implicit) variants give the same 8-bit pixels as their plain twin,
    with the file's own window/min-max and with a configured window over the modality LUT."""
    from pydicom.data import get_testdata_file

    for config in [DicomConfig()] + ([DicomConfig(window=window)] if window else []):
        a = decode(Path(get_testdata_file(compressed)).read_bytes(), 1, config)
        b = decode(Path(get_testdata_file(plain)).read_bytes(), 1, config)
        assert a.shape == b.shape and a.std() > 0
        np.testing.assert_array_equal(a, b)


def test_raw_dataset_without_preamble_decodes_like_its_part10_file():
    part10 = dicom_bytes(CT, slope=1, intercept=-1024)
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, True
    write_dataset(raw, pydicom.dcmread(io.BytesIO(part10)))  # the dataset alone: no preamble, no file meta
    raw_bytes = raw.getvalue()
    assert not raw_bytes[128:132] == b"DICM" and raw_bytes[:2] == b"\x08\x00"
    np.testing.assert_array_equal(decode(raw_bytes, 1, DicomConfig(window="lung")),
                                  decode(part10, 1, DicomConfig(window="lung")))
    assert image_size_of(raw_bytes) == (5, 4, "DICOM")


def test_compressed_frame_larger_than_its_header_is_refused_before_decoding():
    jpeg = io.BytesIO()
    Image.new("L", (64, 48), 7).save(jpeg, "JPEG")
    data = dicom_bytes(np.zeros((8, 8), np.uint8), syntax=JPEGBaseline8Bit, data=encapsulate([jpeg.getvalue()]))
    with pytest.raises(ImageDecodeError, match=r"frame declares 64x48 pixels, more than the header's .*8x8"):
        decode(data, 1)


def test_missing_transfer_syntax_is_named():
    data = dicom_bytes(CT)
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta.TransferSyntaxUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False, implicit_vr=False, little_endian=True)
    with pytest.raises(ImageDecodeError, match=r"\(0002,0010\) Transfer Syntax UID"):
        decode(out.getvalue(), 1)


def test_video_transfer_syntax_is_named_as_having_no_decoder():
    data = dicom_bytes(np.zeros((2, 2), np.uint16), syntax=MPEG2MPML, data=encapsulate([b"\x00\x00\x01\xb3" * 8]))
    with pytest.raises(ImageDecodeError, match=r"transfer syntax MPEG2 Main Profile / Main Level .* has no image "
                                                r"decoder"):
        decode(data, 1)
