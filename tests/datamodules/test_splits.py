"""Split properties, on the real COVID-CT data and on synthetic tables."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from datamodules import ImageDataModule
from datamodules.splits import SplitConfig, compute_split, count_table, load_or_create, parse_ratios
from errors import DataError

CLASSES = ["NonCOVID", "COVID"]


def covid_module(covid_ct, artifacts, **split) -> ImageDataModule:
    return ImageDataModule(
        source=str(covid_ct / "metadata.csv"), classes=CLASSES, image_size=32, artifacts_dir=str(artifacts),
        split=SplitConfig(**split), num_workers=0,
        on_conflict="keep",  # COVID-CT's two cross-class copies, kept as configs/covid_ct.yaml does
    )


@pytest.mark.parametrize("ratios", ["70/20/10", "80/10/10"])
@pytest.mark.parametrize("grouped", [True, False])
def test_ratios_within_one_sample_per_class(covid_ct, shared_artifacts, ratios, grouped):
    dm = covid_module(covid_ct, shared_artifacts, ratios=ratios, group_by_patient=grouped)
    frame = dm.resolve().frame
    table = count_table(frame, CLASSES)
    r = parse_ratios(ratios)
    for row in table.filter(pl.col("class") != "total").iter_rows(named=True):
        for k, name in enumerate(["train", "val", "test"]):
            assert abs(row[name] - row["all"] * r[k]) <= 1.0, (ratios, grouped, row)
    assert table.filter(pl.col("class") == "total")["all"][0] == 746


def test_no_patient_in_two_splits(covid_ct, shared_artifacts):
    frame = covid_module(covid_ct, shared_artifacts, ratios="70/20/10").resolve().frame
    per_patient = frame.group_by("patient_id").agg(pl.col("split").n_unique().alias("n"))
    assert per_patient["n"].max() == 1
    assert per_patient.height == 384


def test_same_seed_gives_byte_identical_file(covid_ct, shared_artifacts):
    a = covid_module(covid_ct, shared_artifacts, seed=7).resolve().split_file
    first = a.read_bytes()
    a.unlink()  # computed again from scratch (the cached images and audit are inputs, not the split)
    b = covid_module(covid_ct, shared_artifacts, seed=7).resolve().split_file
    assert a.name == b.name
    assert b.read_bytes() == first


def test_different_seed_gives_different_split(covid_ct, shared_artifacts):
    a = covid_module(covid_ct, shared_artifacts, seed=1).resolve()
    b = covid_module(covid_ct, shared_artifacts, seed=2).resolve()
    assert a.split_file != b.split_file
    joined = a.frame.select("relpath", "split").join(b.frame.select("relpath", "split"), on="relpath")
    assert (joined["split"] != joined["split_right"]).sum() > 50


def test_split_file_is_read_back_not_recomputed(covid_ct, shared_artifacts, monkeypatch):
    first = covid_module(covid_ct, shared_artifacts, seed=11).resolve()
    import datamodules.splits as splits_mod

    def boom(*a, **k):
        raise AssertionError("split recomputed although its file exists")

    monkeypatch.setattr(splits_mod, "compute_split", boom)
    again = covid_module(covid_ct, shared_artifacts, seed=11).resolve()
    assert again.frame.select("relpath", "split").equals(first.frame.select("relpath", "split"))


def test_manifest_split_column(covid_ct, shared_artifacts):
    dm = ImageDataModule(
        source=str(covid_ct / "metadata.csv"), classes=CLASSES, image_size=32, artifacts_dir=str(shared_artifacts),
        columns={"split": "official_split"}, split=SplitConfig(use_manifest_split=True), on_conflict="keep",
    )
    counts = count_table(dm.resolve().frame, CLASSES).filter(pl.col("class") == "total").row(0, named=True)
    assert (counts["train"], counts["val"], counts["test"]) == (425, 118, 203)


def test_split_ignores_row_order():
    rng = np.random.default_rng(0)
    frame = pl.DataFrame({
        "relpath": [f"img{i:03d}.png" for i in range(200)],
        "label": rng.choice(["a", "b"], 200).tolist(),
        "patient_id": [f"p{i // 3}" for i in range(200)],
        "split": [None] * 200,
    }, schema={"relpath": pl.String, "label": pl.String, "patient_id": pl.String, "split": pl.String})
    cfg = SplitConfig(ratios="70/20/10", seed=3)
    a = compute_split(frame, cfg, ["a", "b"])
    b = compute_split(frame.sample(fraction=1.0, shuffle=True, seed=9), cfg, ["a", "b"])
    assert a.equals(b)


@pytest.mark.parametrize("ratios, message", [
    ("70/20/20", "sum to 1.1"),
    ([0.5, 0.5], "three numbers"),
    ("0/50/50", "positive train share"),
    ("seventy", "cannot read"),
])
def test_impossible_ratios_are_refused(ratios, message):
    with pytest.raises(DataError, match=message):
        parse_ratios(ratios)


def test_class_too_small_to_stratify(tmp_path):
    frame = pl.DataFrame({
        "relpath": [f"{c}{i}.png" for c, n in (("a", 40), ("b", 4)) for i in range(n)],
        "label": ["a"] * 40 + ["b"] * 4,
        "patient_id": [None] * 44, "split": [None] * 44,
    }, schema={"relpath": pl.String, "label": pl.String, "patient_id": pl.String, "split": pl.String})
    with pytest.raises(DataError, match="class 'b' has 4 images: too few to stratify a 70/20/10"):
        load_or_create(frame, SplitConfig(), ["a", "b"], tmp_path, "x", "x")
    grouped = frame.with_columns(patient_id=pl.Series([f"p{i % 20}" for i in range(40)] + ["q1"] * 4))
    with pytest.raises(DataError, match="class 'b' has 4 images from 1 patients"):
        load_or_create(grouped, SplitConfig(), ["a", "b"], tmp_path, "x", "x")


def test_split_file_records_seed_and_hash(covid_ct, shared_artifacts):
    from datamodules.splits import read_split_metadata

    data = covid_module(covid_ct, shared_artifacts, seed=5).resolve()
    meta = read_split_metadata(data.split_file)
    assert meta["seed"] == 5 and meta["key"] in data.split_file.name and len(meta["assignment_hash"]) == 16


def _table(labels: list[str], patients: list[str | None]) -> pl.DataFrame:
    return pl.DataFrame({
        "relpath": [f"img{i:04d}.png" for i in range(len(labels))], "label": labels, "patient_id": patients,
        "split": [None] * len(labels),
    }, schema={"relpath": pl.String, "label": pl.String, "patient_id": pl.String, "split": pl.String})


def _images_per_patient(split: pl.DataFrame) -> dict[str, float]:
    per = split.group_by("split").agg(pl.len().alias("images"), pl.col("patient_id").n_unique().alias("patients"))
    return {r["split"]: r["images"] / r["patients"] for r in per.iter_rows(named=True)}


def test_grouped_split_spreads_big_and_small_patients():
    # 40 patients with 6 images and 160 with one, per class. The old greedy sent the big patients to train
    # (largest first, to the split missing the most images), leaving test with single-image patients.
    labels, patients = [], []
    for c in ("a", "b"):
        for p in range(40):
            labels += [c] * 6
            patients += [f"{c}big{p}"] * 6
        labels += [c] * 160
        patients += [f"{c}one{p}" for p in range(160)]
    split = compute_split(_table(labels, patients), SplitConfig(ratios="70/20/10", seed=1), ["a", "b"])
    ipp = _images_per_patient(split)
    assert abs(ipp["test"] / ipp["train"] - 1) < 0.25 and abs(ipp["val"] / ipp["train"] - 1) < 0.25, ipp
    counts = count_table(split, ["a", "b"]).filter(pl.col("class") == "a").row(0, named=True)
    assert (counts["train"], counts["val"], counts["test"]) == (280, 80, 40)


def test_covid_ct_grouped_split_has_alike_images_per_patient(covid_ct):
    meta = pl.read_csv(covid_ct / "metadata.csv")
    frame = _table(meta["label"].to_list(), meta["patient_id"].cast(pl.String).to_list())
    split = compute_split(frame, SplitConfig(ratios="70/20/10", seed=42), CLASSES)
    ipp = _images_per_patient(split)
    # Before: train 2.57, val 1.31, test 1.12 images per patient (59 of 67 test patients had one image).
    assert abs(ipp["test"] / ipp["train"] - 1) <= 0.25, ipp
    assert abs(ipp["val"] / ipp["train"] - 1) <= 0.25, ipp


def test_three_patients_split_one_per_split():
    # 30 images of class b from 3 patients: 70/20/10 is feasible with one patient per split.
    labels = ["a"] * 100 + ["b"] * 30
    patients = [f"a{i}" for i in range(100)] + [f"b{i // 10}" for i in range(30)]
    split = compute_split(_table(labels, patients), SplitConfig(ratios="70/20/10", seed=0), ["a", "b"])
    b = split.filter(pl.col("label") == "b")
    assert sorted(b.group_by("split").agg(pl.col("patient_id").n_unique())["patient_id"].to_list()) == [1, 1, 1]
    assert b.group_by("patient_id").agg(pl.col("split").n_unique())["split"].max() == 1


def test_missing_patient_ids_are_single_image_groups():
    # Half the rows have no patient id: each is its own group; the others keep their patients together.
    labels = ["a", "b"] * 100
    patients = [None if i % 2 else f"p{i // 8}" for i in range(200)]
    split = compute_split(_table(labels, patients), SplitConfig(ratios="70/20/10", seed=2), ["a", "b"])
    known = split.filter(pl.col("patient_id").is_not_null())
    assert known.group_by("patient_id").agg(pl.col("split").n_unique())["split"].max() == 1
    unknown = split.filter(pl.col("patient_id").is_null())
    assert set(unknown["split"].to_list()) == {"train", "val", "test"}


def _patients_table(n: int = 300, patients: int = 120, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ids = [f"p{rng.integers(0, patients)}" for _ in range(n)]
    return pl.DataFrame({"relpath": [f"img{i:03d}.png" for i in range(n)], "label": [["a", "b", "c"][i % 3] for i in range(n)],
                         "patient_id": ids, "split": [None] * n})


def test_folds_hold_out_test_once_and_partition_the_rest_by_patient():
    from datamodules.splits import apply_fold

    frame = _patients_table()
    split = compute_split(frame, SplitConfig(folds=5, fold=0), ["a", "b", "c"])
    assert split.filter(pl.col("split") == "test")["fold"].is_null().all()
    rest = split.filter(pl.col("split") != "test")
    assert rest["fold"].is_not_null().all() and sorted(rest["fold"].unique().to_list()) == [0, 1, 2, 3, 4]
    assert split.filter(pl.col("split") == "test").height == pytest.approx(30, abs=6)  # the 10% test share
    # No patient spans two folds or a fold and test; every class is in every fold in proportion.
    assert split.group_by("patient_id").agg(pl.col("fold").n_unique(), pl.col("split").n_unique()) \
        .filter((pl.col("fold") > 1) | (pl.col("split") > 1)).is_empty()
    per_fold = rest.group_by("fold", "label").len()
    assert per_fold.height == 15 and per_fold["len"].min() >= 12
    # Each fold in turn is the validation split; test never changes; "all" trains on every non-test image.
    seen = []
    for k in range(5):
        run = apply_fold(split, SplitConfig(folds=5, fold=k))
        assert run.filter(pl.col("split") == "test")["relpath"].to_list() == split.filter(pl.col("split") == "test")["relpath"].to_list()
        seen += run.filter(pl.col("split") == "val")["relpath"].to_list()
    assert sorted(seen) == sorted(rest["relpath"].to_list())
    refit = apply_fold(split, SplitConfig(folds=5, fold="all"))
    assert set(refit["split"].unique().to_list()) == {"train", "test"}


def test_folds_keep_the_manifest_test_split():
    frame = _patients_table().with_columns(split=pl.Series(["test" if i % 10 == 0 else "train" for i in range(300)]))
    cfg = SplitConfig(folds=3, fold=1, use_manifest_split=True, group_by_patient=False, group_by=[])
    split = compute_split(frame, cfg, ["a", "b", "c"])
    assert split.filter(pl.col("split") == "test")["relpath"].to_list() == frame.filter(pl.col("split") == "test")["relpath"].sort().to_list()
    assert split.filter(pl.col("split") != "test")["fold"].value_counts()["count"].to_list() == [90, 90, 90]


@pytest.mark.parametrize(("split", "message"), [
    ({"folds": 1}, "at least 2"), ({"folds": 5}, "fold is not set"), ({"fold": 2}, "folds is 0"),
    ({"folds": 3, "fold": 3}, "0..2 or 'all'"),
])
def test_fold_settings_that_cannot_work_name_the_key(split, message):
    with pytest.raises(DataError, match=message):
        ImageDataModule(split=SplitConfig(**split))


def test_too_few_patients_for_the_folds_is_one_clear_message():
    frame = _patients_table(n=60, patients=4)  # 1 patient for test, 3 for 5 folds
    with pytest.raises(DataError, match="5-fold cross-validation"):
        compute_split(frame, SplitConfig(folds=5, fold=0, ratios="90/0/10"), ["a", "b", "c"])


def test_fold_split_file_differs_from_the_plain_one_and_is_shared_by_all_folds(tmp_path):
    frame = _patients_table()
    plain, _ = load_or_create(frame, SplitConfig(), ["a", "b", "c"], tmp_path, "d", "src")
    f0, _ = load_or_create(frame, SplitConfig(folds=5, fold=0), ["a", "b", "c"], tmp_path, "d", "src")
    f3, _ = load_or_create(frame, SplitConfig(folds=5, fold=3), ["a", "b", "c"], tmp_path, "d", "src")
    assert plain != f0 and f0 == f3
