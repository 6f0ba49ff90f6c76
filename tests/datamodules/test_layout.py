"""Input layout: excluded folders at any depth, and every problem (empty classes included) in one message."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.datamodule import ImageDataModule
from errors import DataError


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)).save(path)


def _module(root, tmp_path, classes=("normal", "covid"), **kw):
    return ImageDataModule(source=str(root), classes=list(classes), image_size=16, num_workers=0,
                           artifacts_dir=str(tmp_path / "a"), audit={"enabled": False}, **kw)


def test_masks_and_annotation_folders_inside_a_class_are_excluded_and_reported(tmp_path):
    root = tmp_path / "data"
    for c, k in (("normal", 0), ("covid", 100)):
        for i in range(10):
            _png(root / c / f"img_{i}.png", k + i)
    for i in range(3):
        _png(root / "normal" / "masks" / f"seg_{i:03d}.png", 500 + i)
        _png(root / "covid" / "p7" / "annotations" / f"a_{i}.png", 600 + i)
    data = _module(root, tmp_path).resolve()
    used = data.frame["relpath"].to_list()
    assert len(used) == 20
    assert not any("masks" in p or "annotations" in p for p in used)
    note = next(n for n in data.notes if "folders matching data.exclude" in n)
    assert "normal/masks/ (3 files)" in note and "covid/p7/annotations/ (3 files)" in note


def test_empty_class_and_bad_files_are_in_one_message(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        _png(root / "normal" / f"img_{i}.png", i)
    (root / "normal" / "broken.png").write_bytes(b"not a png")
    (root / "covid").mkdir()
    with pytest.raises(DataError) as err:
        _module(root, tmp_path).resolve()
    msg = str(err.value)
    assert "1 unusable input(s) and 1 empty class(es)" in msg
    assert "broken.png" in msg and "data.classes lists ['covid']" in msg
