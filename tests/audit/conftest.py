"""A small folder with known duplicates, shared by the audit tests."""

from __future__ import annotations

import shutil

import cv2
import pytest

from audit.copies import jpeg, textured


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 12 distinct images; normal_0 copied exactly into covid (a label conflict); normal_1 saved
    again as JPEG q70 and normal_2 copied twice in its own class (redundant clusters)."""
    root = tmp_path_factory.mktemp("dup") / "data"
    for k, c in enumerate(("normal", "covid")):
        (root / c).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(root / c / f"{c}_{i}.png"), textured(100 * k + i, 128))
    shutil.copy(root / "normal" / "normal_0.png", root / "covid" / "copy_of_normal_0.png")
    cv2.imwrite(str(root / "normal" / "normal_1_again.jpg"), jpeg(textured(1, 128)))
    shutil.copy(root / "normal" / "normal_2.png", root / "normal" / "normal_2_copy.png")
    shutil.copy(root / "normal" / "normal_2.png", root / "normal" / "normal_2_copy2.png")
    return root
