"""Real-world file quirks and bad inputs: each gets a clear message, `skip` records what it dropped."""

from __future__ import annotations

import zlib

import numpy as np
import polars as pl
import pytest
from PIL import Image

from datamodules import ImageDataModule
from datamodules.images import ImageDecodeError, decode, load_image
from errors import DataError
from tests.conftest import cli_in_process, small_fit_args


def write_image(path, mode="RGB", size=(40, 30), fmt=None, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # stable across processes, unlike hash()
    if mode == "I;16":
        arr = (rng.integers(0, 4096, size[::-1])).astype(np.uint16)  # a 12-bit detector in a 16-bit file
        img = Image.fromarray(arr)
    else:
        channels = {"L": 1, "RGB": 3, "RGBA": 4}.get(mode, 3)
        arr = rng.integers(0, 255, (*size[::-1], channels), dtype=np.uint8) if value is None else np.full((*size[::-1], channels), value, np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)
        if mode == "P":
            img = img.convert("P")
    img.save(path, format=fmt)
    return path


def make_folder(root, per_class=12, classes=("benign", "malignant")):
    for c in classes:
        for i in range(per_class):
            write_image(root / c / f"{c}_{i}.png")
    return root


@pytest.mark.parametrize("mode, suffix", [
    ("L", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"), ("RGB", ".bmp"), ("L", ".tif"),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_and_format_decodes_to_the_same_geometry(tmp_path, mode, suffix, channels):
    path = write_image(tmp_path / f"img{suffix}", mode=mode)
    arr = load_image(path, (24, 20), channels)
    assert arr.shape == (24, 20, channels) and arr.dtype == np.uint8
    if mode == "I;16":  # 12-bit content is stretched to the full 8-bit range, not left near-black
        full = decode(path.read_bytes(), channels)
        assert full.shape[:2] == (30, 40) and full.max() == 255 and full.min() == 0


def test_letterbox_keeps_aspect_ratio(tmp_path):
    path = write_image(tmp_path / "wide.png", size=(80, 20), value=200)
    arr = load_image(path, (40, 40), 3, mode="letterbox")
    assert arr[0].max() == 0 and arr[20].min() == 200  # padding above, image in the middle


def test_bad_files_are_all_listed_in_one_message(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "benign" / "empty.png").write_bytes(b"")
    good = (root / "benign" / "benign_0.png").read_bytes()
    (root / "malignant" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "malignant" / "notes.jpg").write_text("this is not an image")
    dm = ImageDataModule(source=str(root), classes=["benign", "malignant"], image_size=16, artifacts_dir=str(tmp_path / "a"))
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "3 unusable input(s)" in msg
    assert "empty.png: empty file (0 bytes)" in msg
    assert "truncated.png: truncated file" in msg
    assert "notes.jpg: not a readable image" in msg
    assert "on_bad_image: skip" in msg


def test_truncated_file_is_caught_even_when_header_is_intact(tmp_path):
    path = write_image(tmp_path / "x.png", size=(200, 200))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(ImageDecodeError, match="truncated|image file is truncated|broken"):
        load_image(path, (8, 8))


def test_manifest_problems(tmp_path):
    make_folder(tmp_path / "data")
    manifest = tmp_path / "data" / "labels.csv"
    rows = [f"benign/benign_{i}.png,benign,p{i}" for i in range(12)] + [f"malignant/malignant_{i}.png,malignant,q{i}" for i in range(12)]
    rows += ["malignant/missing.png,malignant,q99", "benign/benign_1.png,benign,p1", "benign/benign_2.png,cyst,p2"]
    manifest.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    dm = ImageDataModule(source=str(manifest), classes=["benign", "malignant"], image_size=16, artifacts_dir=str(tmp_path / "a"))
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "missing.png: labels.csv row 26: file does not exist" in msg
    assert "row 27: listed again (first at row 3)" in msg
    assert "row 28: label 'cyst' is not in data.classes" in msg


def test_missing_manifest_and_folder(tmp_path):
    with pytest.raises(DataError, match="manifest '.*nope.csv' does not exist"):
        ImageDataModule(source=str(tmp_path / "nope.csv"), classes=["a", "b"], artifacts_dir=str(tmp_path)).prepare_data()
    with pytest.raises(DataError, match="folder '.*nowhere' does not exist"):
        ImageDataModule(source=str(tmp_path / "nowhere"), classes=["a", "b"], artifacts_dir=str(tmp_path)).prepare_data()


def test_classes_must_be_given_and_are_listed(tmp_path):
    root = make_folder(tmp_path / "data")
    with pytest.raises(DataError, match="data.classes is not set.*benign, malignant"):
        ImageDataModule(source=str(root), image_size=16, artifacts_dir=str(tmp_path)).prepare_data()


def test_empty_class(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "normal").mkdir()
    dm = ImageDataModule(source=str(root), classes=["benign", "malignant", "normal"], image_size=16, artifacts_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"lists \['normal'\] but .* has no usable images"):
        dm.prepare_data()


def test_unlisted_folders_and_masks_are_reported_not_used(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    write_image(root / "masks" / "m1.png")
    write_image(root / "benign" / "benign_0_mask.png")
    (root / "benign" / "Thumbs.db").write_bytes(b"\0")
    dm = ImageDataModule(source=str(root), classes=["benign", "malignant"], image_size=16, artifacts_dir=str(tmp_path))
    data = dm.resolve()
    assert set(data.frame["label"].unique()) == {"benign", "malignant"}
    assert data.frame.height == 24
    notes = "\n".join(data.notes)
    assert "masks" in notes and "benign_0_mask.png" in notes and "Thumbs.db" in notes


def test_skip_drops_bad_files_and_records_them_in_the_run_dir(tmp_path, caplog):
    root = make_folder(tmp_path / "data", per_class=15)
    (root / "benign" / "empty.png").write_bytes(b"")
    (root / "malignant" / "bad.png").write_text("nope")
    args = small_fit_args(tmp_path / "a", tmp_path / "runs", f"--data.source={root}", "--data.classes=[benign, malignant]",
                          "--data.on_bad_image=skip", "--data.augmentation=none", "--trainer.limit_train_batches=1",
                          "--trainer.limit_val_batches=1")
    with caplog.at_level("INFO"):
        assert cli_in_process("fit", *args) == 0
    run_dir = next((tmp_path / "runs" / "demo").iterdir())
    skipped = pl.read_csv(run_dir / "skipped_images.csv")
    assert sorted(p.split("/")[-1] for p in skipped["path"]) == ["bad.png", "empty.png"]
    assert "skipped 2 unusable inputs" in caplog.text
    counts = pl.read_csv(run_dir / "split_counts.csv")
    assert counts.filter(pl.col("class") == "total")["all"][0] == 30


def test_cli_prints_data_errors_without_traceback(tmp_path, capsys):
    code = cli_in_process("fit", *small_fit_args(tmp_path / "a", tmp_path / "runs", f"--data.source={tmp_path}/none.csv",
                                                 "--data.classes=[a, b]"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: data.source: manifest")
    assert "Traceback" not in err


def test_bad_augmentation_is_a_config_error(tmp_path):
    with pytest.raises(DataError, match="'HorizntalFlip' is not an albumentations transform. Did you mean"):
        ImageDataModule(augmentation=[{"name": "HorizntalFlip"}], artifacts_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"augmentation\[0\] \(Affine\): unknown argument\(s\) \['rotat'\]; did you mean 'rotate'"):
        ImageDataModule(augmentation=[{"name": "Affine", "rotat": 3}], artifacts_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"augmentation\[0\] \(Affine\): invalid arguments"):
        ImageDataModule(augmentation=[{"name": "Affine", "rotate": "a lot"}], artifacts_dir=str(tmp_path))
    with pytest.raises(DataError, match="changes the image size"):
        ImageDataModule(image_size=32, augmentation=[{"name": "CenterCrop", "height": 16, "width": 16}], artifacts_dir=str(tmp_path))
