"""The audit inside `ImageDataModule.resolve`: conflicts stop the run, clusters never span two splits."""

from __future__ import annotations

import json

import polars as pl
import pytest

from datamodules.datamodule import ImageDataModule
from datamodules.run_record import AUDIT as AUDIT_FILE
from errors import DataError


def _module(root, artifacts, **kw):
    return ImageDataModule(source=str(root), classes=["normal", "covid"], image_size=16, num_workers=0,
                           artifacts_dir=str(artifacts), **kw)


def test_cross_class_cluster_stops_the_run_naming_both_files(folder, tmp_path):
    with pytest.raises(DataError) as err:
        _module(folder, tmp_path).resolve()
    msg = str(err.value)
    assert "1 duplicate cluster(s)" in msg
    assert "normal/normal_0.png (normal)" in msg and "covid/copy_of_normal_0.png (covid)" in msg
    assert "data.on_conflict" in msg


def test_drop_removes_the_conflict_and_no_cluster_spans_two_splits(folder, tmp_path):
    data = _module(folder, tmp_path, on_conflict="drop").resolve()
    paths = data.frame["relpath"].to_list()
    assert "normal/normal_0.png" not in paths and "covid/copy_of_normal_0.png" not in paths
    assert data.audit["dropped"] == ["covid/copy_of_normal_0.png", "normal/normal_0.png"]
    clusters = data.clusters
    assert clusters.height == 2  # the JPEG re-encode pair and the triple copy
    assert sorted(clusters["size"].to_list()) == [2, 3]
    assert clusters.filter(pl.col("exact"))["size"].to_list() == [3]
    assert not clusters["leakage"].any() and clusters["redundant"].all()
    spans = data.frame.filter(pl.col("cluster_id").is_not_null()).group_by("cluster_id").agg(pl.col("split").n_unique())
    assert (spans["split"] == 1).all()


def test_keep_trains_on_conflicts_and_records_it_in_the_run_dir(folder, tmp_path):
    dm = _module(folder, tmp_path, on_conflict="keep")
    data = dm.resolve()
    assert data.audit["label_conflict"] == 1 and data.audit["conflict_clusters"] == 1
    assert "keep: 1 cross-class cluster(s)" in data.audit["conflict_action"]

    class _Trainer:  # the two attributes _record_in_run_dir reads
        default_root_dir = str(tmp_path / "run")
        global_rank = 0

    dm.trainer = _Trainer()
    dm._record_in_run_dir(data)
    recorded = json.loads((tmp_path / "run" / AUDIT_FILE).read_text())
    assert recorded["on_conflict"] == "keep" and recorded["label_conflict"] == 1


def test_without_duplicate_grouping_the_manifest_split_shows_leakage(folder, tmp_path):
    rows = [(f"normal/normal_{i}.png", "normal", "train" if i < 8 else "test") for i in range(12)]
    rows += [(f"covid/covid_{i}.png", "covid", "train" if i < 8 else "test") for i in range(12)]
    rows += [("normal/normal_2_copy.png", "normal", "test")]  # normal_2 is in train
    manifest = folder / "manifest.csv"
    pl.DataFrame(rows, schema=["path", "label", "split"], orient="row").write_csv(manifest)
    data = _module(manifest, tmp_path, split={"use_manifest_split": True}).resolve()
    assert data.audit["leakage"] == 1
    leak = data.clusters.filter(pl.col("leakage"))
    assert leak["files"].to_list() == [["normal/normal_2.png", "normal/normal_2_copy.png"]]
    from datamodules.duplicate_audit import summary_text

    printed = summary_text(data.audit, "run/audit_clusters.parquet", data.clusters, manifest_split=True)
    assert "leakage c" in printed and "normal/normal_2.png (train), normal/normal_2_copy.png (test)" in printed


def test_a_runs_audit_goes_into_another_report(folder, tmp_path):
    """What a sweep report shows: the winner run's audit summary, and the full audit beside it."""
    from audit.report import add_audit_section
    from evaluation.document import Document

    dm = _module(folder, tmp_path, on_conflict="keep")

    class _Trainer:
        default_root_dir = str(tmp_path / "run")
        global_rank = 0

    dm.trainer = _Trainer()
    dm._record_in_run_dir(dm.resolve())
    doc = Document(tmp_path)
    page = add_audit_section(doc, tmp_path / "run", tmp_path / "audit")
    assert page == tmp_path / "audit" / "audit.html" and page.exists()
    text = doc.markdown()
    assert "## Data audit" in text and "label conflicts 1" in text and "audit/audit.html" in text
    assert add_audit_section(Document(tmp_path), tmp_path / "no_run", tmp_path / "x") is None
