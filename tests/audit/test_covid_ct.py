"""The audit on the real COVID-CT data (skips, naming the path, where it is absent)."""

from __future__ import annotations

import cv2
import numpy as np
import polars as pl
import pytest

from datamodules.datamodule import ImageDataModule
from datamodules.duplicate_check import FINE_SIZE, confirm, confirm_fine
from datamodules.images import resize
from errors import DataError


@pytest.mark.slow
def test_covid_ct_cross_class_copies_are_found_and_stop_a_default_run(covid_ct, tmp_path):
    args = dict(source=str(covid_ct / "metadata.csv"), classes=["NonCOVID", "COVID"], image_size=32,
                num_workers=0, artifacts_dir=str(tmp_path), columns={"split": "official_split"})
    with pytest.raises(DataError) as err:
        ImageDataModule(**args).resolve()
    msg = str(err.value)
    assert "2 duplicate cluster(s)" in msg
    assert "CT_COVID/kjr-21-e24-p5-29.png (COVID)" in msg and "CT_NonCOVID/71%0.jpg (NonCOVID)" in msg
    data = ImageDataModule(**args, on_conflict="keep", split={"use_manifest_split": True}).resolve()
    assert data.audit["label_conflict"] == 2 and data.audit["exact_clusters"] == 0
    # The official split puts each copy of the 2 conflicts on another side, and the two figures of one
    # re-export (p24-1533-6 and p25-1543, p24-1533-7 and p25-1546: another crop and scale) in val and test.
    assert data.audit["leakage"] == 4
    grouped = ImageDataModule(**args, on_conflict="keep", split={"ratios": "80/10/10"}).resolve()
    spans = grouped.frame.filter(pl.col("cluster_id").is_not_null()).group_by("cluster_id").agg(pl.col("split").n_unique())
    assert (spans["split"] == 1).all()


KNOWN = [  # the 7 clusters the audit found before issue 18: 2 label conflicts, 5 redundant
    ["CT_COVID/kjr-21-e24-p5-29.png", "CT_NonCOVID/71%0.jpg"], ["CT_COVID/kjr-21-e24-p5-31.png", "CT_NonCOVID/71%1.jpg"],
    ["CT_NonCOVID/114.png", "CT_NonCOVID/116.png", "CT_NonCOVID/118.png"], ["CT_NonCOVID/115.png", "CT_NonCOVID/117.png"],
    ["CT_NonCOVID/1330.png", "CT_NonCOVID/1331.png"], ["CT_NonCOVID/1497.png", "CT_NonCOVID/1498.png"],
    ["CT_NonCOVID/661.png", "CT_NonCOVID/662.png"],
]


@pytest.mark.slow
def test_covid_ct_audit_keeps_every_known_cluster_and_finds_the_marked_and_rescaled_copies(covid_ct, tmp_path):
    data = ImageDataModule(source=str(covid_ct / "metadata.csv"), classes=["NonCOVID", "COVID"], image_size=32,
                           num_workers=0, artifacts_dir=str(tmp_path), on_conflict="keep").resolve()
    clusters = [set(files) for files in data.clusters["files"].to_list()]
    for known in KNOWN:
        assert any(set(known) <= c for c in clusters), known
    assert data.audit["label_conflict"] == 2
    assert {"CT_NonCOVID/1330.png", "CT_NonCOVID/1332.png"} <= next(c for c in clusters if "CT_NonCOVID/1330.png" in c)
    assert {"CT_COVID/2020.03.22.20040782-p24-1533-6.png", "CT_COVID/2020.03.22.20040782-p25-1543.png"} in clusters
    # the second figure of that re-export: 0.895 at 64 px, linked by the fine check at 256 px (0.869)
    assert {"CT_COVID/2020.03.22.20040782-p24-1533-7.png", "CT_COVID/2020.03.22.20040782-p25-1546.png"} in clusters
    # the adjacent slices stay apart
    assert not any({"CT_COVID/2020.02.22.20024927-p19-68%1.png", "CT_NonCOVID/30%1.jpg"} <= c for c in clusters)
    assert max(len(c) for c in clusters) <= 3  # no chains


@pytest.mark.slow
def test_adjacent_slices_that_a_reencode_lifts_over_the_threshold_are_vetoed_and_copies_are_not(covid_ct):
    """39%3 and 39%6 (146 px, adjacent slices) score 0.90 at 64 px once one is re-encoded; at 256 px they move
    non-rigidly and differ widely, which no copy does (1330 and 1332: one slice, arrows burnt in on one)."""
    def pair(a: str, b: str):
        files = [cv2.imread(str(covid_ct / name), cv2.IMREAD_GRAYSCALE) for name in (a, b)]
        small = [resize(f[..., None], (64, 64)) for f in files]
        _, warp = confirm(*small)
        assert warp is not None, f"{a} and {b} did not register at 64 px"
        return confirm_fine(*(resize(f[..., None], (FINE_SIZE, FINE_SIZE))[..., 0].astype(np.float32) for f in files), warp)

    assert pair("CT_NonCOVID/39%3.jpg", "CT_NonCOVID/39%6.jpg").is_other_image()
    assert pair("CT_NonCOVID/1099.png", "CT_NonCOVID/1100.png").is_other_image()
    assert not pair("CT_NonCOVID/1330.png", "CT_NonCOVID/1332.png").is_other_image()
