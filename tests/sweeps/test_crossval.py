"""Cross-validated selection (`cv: {folds: k}`) with the fake trial runner on a real SQLite study: fold runs
as grid points, fold-mean leaderboards, out-of-fold files, both comparisons, the refit and the ensemble.
The real k-fold sweep on COVID-CT is in test_e2e.py (slow)."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from runs import files
from runs.files import RunFiles
from sweeps import crossval
from sweeps import sweep as sweep_mod
from sweeps.config import CrossValidation
from tests.sweeps.fakes import FakeTrials, no_preflight, tiny_sweep


@pytest.fixture(scope="module")
def cv_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    sweep, fake = tiny_sweep(tmp, cv=CrossValidation(folds=3)), FakeTrials()
    summary = sweep_mod.run(sweep, execute=fake, preflight=no_preflight)
    return sweep, fake, summary


def test_every_grid_point_trains_once_per_fold_then_the_winner_is_refit(cv_sweep):
    sweep, fake, summary = cv_sweep
    assert sweep_mod.exit_code(sweep, summary) == 0
    splits = [c["data"]["split"] for c in fake.configs]
    # 2 candidates and 2x2 pairs, 3 folds each, less the 3 fold runs of adam + ce on resnet10t (stage 1's own
    # config: reused, `sweeps.reuse`); one refit
    assert len(fake.calls) == 2 * 3 + 3 * 3 + 1
    # breadth-first: fold 0 of every point, then fold 1, then fold 2
    assert [s["fold"] for s in splits[:6]] == [0, 0, 1, 1, 2, 2] and [s["fold"] for s in splits[6:15]] == [0] * 3 + [1] * 3 + [2] * 3
    for stage, (lo, hi) in {"stage1": (0, 6), "stage2": (6, 15)}.items():
        runs = Counter((call, s["fold"]) for call, s in zip(fake.calls[lo:hi], splits[lo:hi], strict=True))
        assert set(runs.values()) == {1} and len(runs) == hi - lo, stage
    assert all(s["folds"] == 3 for s in splits)
    # The refit: the winning configuration on every non-test image, for the median best epoch of its folds.
    refit = fake.configs[-1]
    assert splits[-1]["fold"] == "all" and fake.calls[-1] == ("resnet10t", "Adam", "ce")
    assert refit["trainer"]["max_epochs"] == 2 == summary["cv"]["refit_epochs"]  # every fold's best epoch is its last
    assert summary["run_dir"] == "final/refit" and summary["cv"]["final"] == "refit"


def test_leaderboards_show_fold_means_with_intervals_and_both_comparisons(cv_sweep):
    sweep, _, summary = cv_sweep
    board = pl.read_parquet(sweep.out_dir / "stage1_leaderboard.parquet")
    assert board["candidate"].to_list() == ["resnet10t", "ctnet10"]
    assert board["repeats"].to_list() == [3, 3] and board["complete"].all()  # 3 fold runs each
    assert board["val/loss ±95%"].is_not_null().all()
    assert board["first_in_repeats"].to_list() == ["3/3", "0/3"]
    loser = board.row(1, named=True)
    assert loser["vs_winner"] and loser["vs_winner_folds"]  # OOF paired bootstrap and corrected t-test
    report = (sweep.out_dir / "report.md").read_text()
    assert "3-fold cross-validation" in report and "out-of-fold predictions" in report
    assert "corrected resampled t-test" in report and "refit" in report.lower()
    assert summary["val"]["val/loss"] == pytest.approx(board2_mean(sweep))


def board2_mean(sweep) -> float:
    board = pl.read_parquet(sweep.out_dir / "stage2_leaderboard.parquet")
    return board.row(0, named=True)["val/loss"]


def test_out_of_fold_files_cover_every_non_test_image_once(cv_sweep):
    sweep, _, _ = cv_sweep
    paths = sorted((sweep.out_dir / crossval.OOF_DIR / "stage1").glob("*.parquet"))
    assert [p.stem for p in paths] == ["ctnet10", "resnet10t"]
    for path in paths:
        oof = pl.read_parquet(path)
        assert oof.height == 48 and oof["path"].n_unique() == 48  # images 12..59, each in one fold
        assert sorted(oof["fold"].unique().to_list()) == [0, 1, 2]
        assert {"p_a", "p_b", "target", "patient_id"} <= set(oof.columns)
    assert len(list((sweep.out_dir / crossval.OOF_DIR / "stage2").glob("*.parquet"))) == 4


def test_a_failed_fold_makes_its_grid_point_incomplete(tmp_path, no_plots):
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=2), allow_failures=True)
    summary = sweep_mod.run(sweep, execute=FakeTrials({"resnet10t": ["failed"]}), preflight=no_preflight)
    board = pl.read_parquet(sweep.out_dir / "stage1_leaderboard.parquet")
    row = board.filter(pl.col("candidate") == "resnet10t").row(0, named=True)
    assert row["repeats"] == 1 and row["complete"] is False
    assert summary["base_architecture"] == "ctnet10"  # the better but incomplete point cannot win
    assert any("fold=0" in r["grid point"] for r in summary["incomplete"])


def test_ensemble_scores_the_averaged_fold_probabilities(tmp_path):
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=2, final="ensemble"))
    members = [sweep.out_dir / "trials" / "stage2" / f"m{k}" for k in range(2)]
    paths = [f"t{i}.png" for i in range(8)]
    labels = ["a", "b"] * 4
    # Member 0 is right on images 0-5, member 1 on 2-7 (each 75%); right with p = 0.9 for the true class,
    # wrong with p = 0.4, so the averaged probabilities are right on all 8.
    for k, run_dir in enumerate(members):
        right = [(k == 0 and i < 6) or (k == 1 and i >= 2) for i in range(8)]
        p_true = [0.9 if ok else 0.4 for ok in right]
        p_b = [p if lab == "b" else 1 - p for lab, p in zip(labels, p_true, strict=True)]
        run = RunFiles(run_dir)
        run_dir.mkdir(parents=True)
        pl.DataFrame({"path": paths, "label": labels, "patient_id": [None] * 8, "predicted": ["a"] * 8,
                      "p_a": [1 - p for p in p_b], "p_b": p_b}).write_parquet(run / files.TEST_PREDICTIONS)
        run.write_json(files.MODEL_INFO, {"positive_class": "b"})
    tested = []
    result = crossval.ensemble_test(sweep, members, tested.append)
    assert tested == members
    assert result["metrics"]["acc"] == pytest.approx(1.0) and result["n_images"] == 8
    assert result["intervals"]["acc"][0] <= 1.0 <= result["intervals"]["acc"][1] + 1e-9
    saved = json.loads((sweep.out_dir / crossval.FINAL_DIR / "ensemble" / files.TEST_METRICS).read_text())
    assert saved["members"] == ["trials/stage2/m0", "trials/stage2/m1"]


def test_refit_epochs_is_the_median_best_epoch():
    frame = pl.DataFrame({"epoch": [3, 7, 5, 9]})  # 0-based best epochs -> 4, 8, 6, 10 epochs; median 7
    assert crossval.refit_epochs(frame) == 7
    assert crossval.refit_epochs(pl.DataFrame({"epoch": [1, 2]})) == 3  # median 2.5 rounds up


def test_bad_folds_are_a_config_problem(tmp_path):
    assert any("cv.folds" in p for p in tiny_sweep(tmp_path, cv=CrossValidation(folds=1)).problems())


def test_an_interrupted_fold_is_retried_alone_on_rerun(tmp_path, no_plots):
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=2))
    first = sweep_mod.run(sweep, execute=FakeTrials({"ctnet10": ["interrupted"]}), preflight=no_preflight)
    assert sweep_mod.exit_code(sweep, first) == 1 and "base_architecture" not in first
    assert [(row["state"], "fold=0" in row["grid point"]) for row in first["incomplete"]] == [("interrupted", True)]
    again = FakeTrials()
    second = sweep_mod.run(sweep, execute=again, preflight=no_preflight)
    assert sweep_mod.exit_code(sweep, second) == 0
    assert again.calls[0] == ("ctnet10", "Adam", "ce") and again.configs[0]["data"]["split"]["fold"] == 0
    assert len(again.calls) == 1 + 3 * 2 + 1  # the interrupted fold, stage 2's folds (adam + ce reused), the refit


def test_a_refit_is_reused_only_for_the_same_winner(tmp_path):
    sweep = tiny_sweep(tmp_path, cv=CrossValidation(folds=2))
    fake = FakeTrials()
    trials = pl.DataFrame({"epoch": [1, 1]})
    adam = {"model": {"network": {"name": "resnet10t"}, "optimizer": {"class_path": "torch.optim.Adam"}, "loss": "ce"},
            "trainer": {"max_epochs": 9}}
    mse = {**adam, "model": {**adam["model"], "loss": "mse"}}
    for cfg in (adam, adam, mse, mse):
        run_dir = crossval.refit(sweep, cfg, trials, [], fake)
        (RunFiles(run_dir).checkpoints).mkdir(parents=True, exist_ok=True)
        RunFiles(run_dir).best_checkpoint.write_bytes(b"weights")  # the fake trains no checkpoint itself
    assert [c[2] for c in fake.calls] == ["ce", "mse"]  # trained once per winner; the rerun of each reused it


def test_a_study_resumed_with_other_folds_is_refused(tmp_path, no_plots):
    from errors import ConfigError

    sweep_mod.run(tiny_sweep(tmp_path, cv=CrossValidation(folds=2)), execute=FakeTrials(), preflight=no_preflight)
    with pytest.raises(ConfigError, match="cv.folds 2 but the sweep now says 3"):
        sweep_mod.run(tiny_sweep(tmp_path, cv=CrossValidation(folds=3)), execute=FakeTrials(), preflight=no_preflight)


def test_repeats_of_a_fold_are_averaged_into_one_sample():
    frame = pl.DataFrame({
        "candidate": ["a"] * 4 + ["b"] * 3, "repeat": [0, 1, 0, 1, 0, 1, 0], "fold": [0, 0, 1, 1, 0, 0, 1],
        "val/acc": [0.6, 0.8, 0.5, 0.7, 0.4, 0.6, 0.3], "params": [1] * 7, "run_dir": [f"r{i}" for i in range(7)],
        "trial": list(range(7)),
    })
    samples = crossval.as_samples(frame, ["candidate"], folds=2, repeats=2)
    a = samples.filter(pl.col("candidate") == "a")
    assert a["repeat"].to_list() == [0, 1] and a["val/acc"].to_list() == pytest.approx([0.7, 0.6])
    # b's fold 1 lacks a repeat: that fold is no sample, so b has 1 of 2 folds and is incomplete.
    assert samples.filter(pl.col("candidate") == "b")["fold"].to_list() == [0]
