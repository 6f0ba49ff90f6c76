"""The audit on the real COVID-CT data (skips, naming the path, where it is absent)."""

from __future__ import annotations

import polars as pl
import pytest

from datamodules.datamodule import ImageDataModule
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
    assert data.audit["leakage"] == 2  # the official split puts each copy on another side
    grouped = ImageDataModule(**args, on_conflict="keep", split={"ratios": "80/10/10"}).resolve()
    spans = grouped.frame.filter(pl.col("cluster_id").is_not_null()).group_by("cluster_id").agg(pl.col("split").n_unique())
    assert (spans["split"] == 1).all()
