"""Paired comparisons of a stage's winner with the other candidates, on synthetic predictions with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from torchmetrics.functional.classification import (
    binary_recall,
    binary_specificity,
    multiclass_accuracy,
    multiclass_recall,
    multiclass_specificity,
)

from runs import files
from sweeps.compare import (
    Difference,
    bootstrap_weights,
    compare_stage,
    corrected_t_test,
    headline_metric,
    mark,
    method_text,
    paired_bootstrap,
    verdict,
    weighted_metric,
)


def one_hot_probs(pred: np.ndarray, k: int = 2, confidence: float = 0.9) -> np.ndarray:
    probs = np.full((len(pred), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


@pytest.mark.parametrize("k", [2, 3])
def test_metrics_with_unit_weights_match_torchmetrics(k):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, k, 90)
    probs = rng.dirichlet(np.ones(k), 90)
    ones = np.ones((1, 90))
    p, t = torch.tensor(probs), torch.tensor(targets)
    pred = p.argmax(1)
    got = {m: weighted_metric(probs, targets, ones, m)[0] for m in ("acc", "balanced_acc", "sensitivity", "specificity", "nll")}
    assert got["acc"] == pytest.approx(float((pred == t).float().mean()))
    assert got["balanced_acc"] == pytest.approx(float(multiclass_accuracy(pred, t, k, average="macro")))
    if k == 2:
        assert got["sensitivity"] == pytest.approx(float(binary_recall(pred, t)))
        assert got["specificity"] == pytest.approx(float(binary_specificity(pred, t)))
    else:
        assert got["sensitivity"] == pytest.approx(float(multiclass_recall(pred, t, k, average="macro")))
        assert got["specificity"] == pytest.approx(float(multiclass_specificity(pred, t, k, average="macro")))
    assert got["nll"] == pytest.approx(float(-p[torch.arange(90), t].log().mean()))


def test_bootstrap_weights_keep_classes_and_patients_whole():
    targets = np.array([0] * 6 + [1] * 4)
    groups = np.array(["a", "a", "b", "b", "c", "d", "e", "e", "f", "g"])
    w = bootstrap_weights(targets, groups, 500, seed=1)
    assert w.shape == (500, 10)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 6] == w[:, 7]).all()  # a patient's images move together
    # class 0 has 4 patients, class 1 has 3: each resample draws 4 and 3 of them
    assert ((w[:, [0, 2, 4, 5]]).sum(1) == 4).all() and ((w[:, [6, 8, 9]]).sum(1) == 3).all()
    assert (w[:, targets == 1].sum(1) > 0).all()
    plain = bootstrap_weights(targets, None, 200, seed=2)
    assert (plain[:, targets == 0].sum(1) == 6).all() and (plain[:, targets == 1].sum(1) == 4).all()


def test_identical_models_are_indistinguishable_with_a_zero_interval():
    targets = np.array([0, 1] * 30)
    probs = one_hot_probs(np.array([0, 1, 1] * 20))
    d = paired_bootstrap(probs, probs, targets, n_resamples=300)
    assert (d.diff, d.low, d.high) == (0.0, 0.0, 0.0) and d.indistinguishable


def test_paired_interval_of_a_clear_gap_matches_the_normal_approximation():
    # a is right on all 100 images, b wrong on 30: the difference 0.30 has a standard error of about
    # sqrt(0.3 * 0.7 / 100) = 0.046, so the 95% interval is near [0.21, 0.39] and excludes 0.
    targets = np.array([0, 1] * 50)
    pred_b = targets.copy()
    pred_b[:30] = 1 - pred_b[:30]
    d = paired_bootstrap(one_hot_probs(targets), one_hot_probs(pred_b), targets, n_resamples=4000, seed=3)
    assert d.diff == pytest.approx(0.30)
    assert d.low == pytest.approx(0.21, abs=0.03) and d.high == pytest.approx(0.39, abs=0.03)
    assert not d.indistinguishable


def test_pairing_cancels_shared_mistakes():
    # The two models agree on 90 of 100 images (wrong together on 25 of them) and differ on 10: a is right
    # on 8, b on 2. Paired: d is +1 (8), -1 (2), 0 (90): sd(d)/sqrt(n) = 0.031. Unpaired accuracies of
    # 0.71 and 0.65 would each carry +-0.09.
    targets = np.array([0, 1] * 50)
    pred_a, pred_b = targets.copy(), targets.copy()
    pred_a[:25] = pred_b[:25] = 1 - targets[:25]  # shared mistakes
    pred_a[25:27] = 1 - targets[25:27]  # a wrong where b is right (2)
    pred_b[27:35] = 1 - targets[27:35]  # b wrong where a is right (8)
    d = paired_bootstrap(one_hot_probs(pred_a), one_hot_probs(pred_b), targets, n_resamples=4000, seed=4)
    assert d.diff == pytest.approx(0.06)
    assert d.high - d.low < 0.14
    assert d.low > -0.02


def test_patient_grouping_widens_the_paired_interval():
    targets = np.repeat(np.array([0, 1] * 25), 4)  # 50 patients with 4 identical-outcome images each
    pred_b = targets.copy()
    pred_b[: 4 * 10] = 1 - pred_b[: 4 * 10]
    a, b = one_hot_probs(targets), one_hot_probs(pred_b)
    groups = np.repeat(np.arange(50), 4)
    by_image = paired_bootstrap(a, b, targets, None, n_resamples=2000, seed=5)
    by_patient = paired_bootstrap(a, b, targets, groups, n_resamples=2000, seed=5)
    assert by_patient.diff == by_image.diff
    assert (by_patient.high - by_patient.low) > 1.6 * (by_image.high - by_image.low)


def test_corrected_resampled_t_test_by_hand():
    # d = (0.10, 0.10, 0.05): mean 0.08333, s^2 = 0.0008333; n_test/n_train = 0.25.
    # corrected se = sqrt((1/3 + 0.25) * 0.0008333) = 0.022048; t(0.975, 2) = 4.302653 -> half 0.094866.
    d = corrected_t_test([0.80, 0.90, 0.85], [0.70, 0.80, 0.80], test_train_ratio=0.25)
    assert d.diff == pytest.approx(0.083333, abs=1e-6)
    assert d.low == pytest.approx(0.083333 - 0.094866, abs=1e-5) and d.high == pytest.approx(0.083333 + 0.094866, abs=1e-5)
    assert d.indistinguishable  # the uncorrected t-interval, 0.0833 +- 0.0717, would exclude 0
    uncorrected = corrected_t_test([0.80, 0.90, 0.85], [0.70, 0.80, 0.80], test_train_ratio=0.0)
    assert uncorrected.low == pytest.approx(0.083333 - 4.302653 * math.sqrt(0.00083333 / 3), abs=1e-5)
    assert not uncorrected.indistinguishable
    assert math.isnan(corrected_t_test([0.8], [0.7], 0.25).low)


def test_headline_metric():
    assert headline_metric("rank_score", "val/acc") == ("acc", "")
    assert headline_metric("metric", "val/balanced_acc") == ("balanced_acc", "")
    name, note = headline_metric("metric", "val/auroc")
    assert name == "acc" and "val/auroc" in note


def board(params=(5_000, 1_000, 9_000)) -> pl.DataFrame:
    return pl.DataFrame({"rank": [1, 2, 3], "candidate": ["W", "S", "L"], "params": list(params)})


def test_verdict_names_the_simplest_indistinguishable_candidate():
    marked = mark(board(), {1: Difference(0.02, -0.03, 0.07, "x"), 2: Difference(0.2, 0.1, 0.3, "x")})
    assert marked["indistinguishable"].to_list() == [None, True, False]
    assert marked["vs_winner"][1] == "+0.020 [-0.030, +0.070]"
    text, simplest = verdict(marked, lambda r: r["candidate"])
    assert "cannot separate the winner W from S" in text and "parsimonious choice" in text
    assert simplest["candidate"] == "S"
    clear = mark(board(), {1: Difference(0.2, 0.1, 0.3, "x"), 2: Difference(0.2, 0.1, 0.3, "x")})
    text, simplest = verdict(clear, lambda r: r["candidate"])
    assert simplest is None and "better than every other candidate" in text
    winner_simplest = mark(board((500, 1_000, 9_000)), {1: Difference(0.0, -0.1, 0.1, "x")})
    assert verdict(winner_simplest, lambda r: r["candidate"])[1] is None
    # The rank score's winner can lose on accuracy alone: then it is not called "better than every other".
    beaten = mark(board(), {1: Difference(-0.2, -0.3, -0.1, "x"), 2: Difference(0.2, 0.1, 0.3, "x")})
    text, _ = verdict(beaten, lambda r: r["candidate"])
    assert "better than every" not in text and text.startswith("S scored better than the winner")


def write_run(root, name: str, pred: np.ndarray, targets: np.ndarray, patients) -> str:
    run = root / name
    run.mkdir()
    name = run.name  # run_dir values are relative to the sweep folder
    probs = one_hot_probs(pred)
    pl.DataFrame({"path": [f"img{i}.png" for i in range(len(targets))], "patient_id": patients, "target": targets,
                  "p_a": probs[:, 0], "p_b": probs[:, 1]}).write_parquet(run / files.VAL_PREDICTIONS)
    (run / files.TRAIN_EVAL).write_text(json.dumps({"n_train": 400, "n_val": 100, "metrics": {}}))
    return name


def test_compare_stage_single_repeat_uses_paired_bootstrap(tmp_path):
    targets = np.array([0, 1] * 50)
    patients = [f"p{i // 2}" if i % 5 else None for i in range(100)]
    near, far = targets.copy(), targets.copy()
    near[:3] = 1 - near[:3]
    far[:40] = 1 - far[:40]
    trials = pl.DataFrame({
        "candidate": ["W", "S", "L"], "repeat": [0, 0, 0], "params": [5_000, 1_000, 9_000],
        "run_dir": [write_run(tmp_path, n, p, targets, patients) for n, p in (("W", targets), ("S", near), ("L", far))],
    })
    marked = compare_stage(trials, board(), ["candidate"], "rank_score", "val/acc", tmp_path, n_resamples=500)
    assert marked["indistinguishable"].to_list() == [None, True, False]
    assert marked["vs_winner_diff"][2] == pytest.approx(0.40)
    method = method_text(trials, board(), ["candidate"], "rank_score", "val/acc", tmp_path)
    assert "paired bootstrap" in method and "100 validation images" in method and "50 patient ids" in method


def test_compare_stage_repeats_use_the_corrected_t_test(tmp_path):
    runs = {c: write_run(tmp_path, c, np.array([0, 1]), np.array([0, 1]), [None, None]) for c in "WSL"}
    rows = []
    for r, (w, s, big) in enumerate([(0.80, 0.78, 0.60), (0.90, 0.85, 0.62), (0.85, 0.86, 0.61)]):
        rows += [{"candidate": c, "repeat": r, "params": p, "run_dir": runs[c], "val/acc": v}
                 for c, p, v in (("W", 5_000, w), ("S", 1_000, s), ("L", 9_000, big))]
    marked = compare_stage(pl.DataFrame(rows), board(), ["candidate"], "rank_score", "val/acc", tmp_path)
    assert "Nadeau" in method_text(pl.DataFrame(rows), board(), ["candidate"], "rank_score", "val/acc", tmp_path)
    assert "0.250" in method_text(pl.DataFrame(rows), board(), ["candidate"], "rank_score", "val/acc", tmp_path)
    assert marked["indistinguishable"].to_list() == [None, True, False]


def test_lower_is_better_metric_is_reported_winner_better_positive(tmp_path):
    targets = np.array([0, 1] * 20)
    trials = pl.DataFrame({
        "candidate": ["W", "S"], "repeat": [0, 0], "params": [1, 2],
        "run_dir": [write_run(tmp_path, "W", targets, targets, [None] * 40),
                    write_run(tmp_path, "S", 1 - targets, targets, [None] * 40)],
    })
    marked = compare_stage(trials, board().head(2), ["candidate"], "metric", "val/nll", tmp_path, n_resamples=200)
    assert marked["vs_winner_diff"][1] > 0 and marked["indistinguishable"][1] is False


@pytest.mark.slow
def test_real_sweep_marks_indistinguishable_candidates_and_says_which_terms_it_ranked(tmp_path, shared_artifacts):
    import yaml

    from tests.conftest import REPO, run_cli
    from tests.sweeps.verdicts import assert_verdicts

    cfg = {
        "name": "cmp", "base_config": str(REPO / "configs" / "demo.yaml"), "root": str(tmp_path / "sweeps"),
        "overrides": {"run": {"early_stopping_patience": None}, "trainer": {"enable_model_summary": False},
                      "data": {"num_workers": 0, "artifacts_dir": str(shared_artifacts)}},
        "stage1": {"candidates": [{"network": "ctnet10"}, {"network": "ctnet10", "label": "ctnet10-lr01", "lr": 0.01}],
                   "defaults": {"optimizer": "adam", "loss": "ce", "batch_size": 32, "max_epochs": 2, "image_size": 32}},
        "stage2": {"optimizers": ["adam"], "losses": ["ce", "mse"]}, "wandb": "disabled",
    }
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("sweep", "--config", str(tmp_path / "cmp.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = tmp_path / "sweeps" / "cmp"
    for stage in ("stage1", "stage2"):
        board = pl.read_parquet(out / f"{stage}_leaderboard.parquet")
        assert board["indistinguishable"][0] is None and board["indistinguishable"][1] is not None
        assert board["vs_winner"][1].count("[") == 1 and board["complete"].all()
        assert "train_eval/overfit" in board.columns  # the eval-mode overfit term was ranked
    report = (out / "report.md").read_text()
    assert "ranks `val/nll`" in report and "`train_eval/overfit`" in report and "paired bootstrap" in report
    assert_verdicts(out, report)
