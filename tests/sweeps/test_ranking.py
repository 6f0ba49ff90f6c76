"""Study 002's overall score, by hand from the paper's definition (section 2.4.2), and repeats."""

from __future__ import annotations

import math

import polars as pl
import pytest

from errors import SweepError
from sweeps.config import RankTerm, Selection
from sweeps.ranking import (
    descending_ranks,
    leaderboard,
    order,
    points,
    rank_scores,
    resolve_terms,
    t_interval,
)


def models(params_p=5_000_000, params_q=3_000_000) -> pl.DataFrame:
    # P and Q tie on accuracy, sensitivity and specificity; R is worse on those.
    return pl.DataFrame({
        "candidate": ["P", "Q", "R"],
        "val/overfit": [0.05, 0.10, 0.20],
        "val/acc": [0.90, 0.90, 0.70],
        "val/loss": [0.60, 0.20, 0.55],
        "val/sensitivity": [0.80, 0.80, 0.60],
        "val/specificity": [0.90, 0.90, 0.60],
        "params": [params_p, params_q, 1_000_000],
    })


def test_ranks_follow_the_paper():
    # "the highest value is always given a rank of 1, and the lowest value ... a rank of N"; equal values
    # get the average of the ranks they span (so the lowest value still averages to N); NaN ranks last.
    assert descending_ranks([0.05, 0.10, 0.20]) == [3, 2, 1]
    assert descending_ranks([0.9, 0.9, 0.7]) == [1.5, 1.5, 3]
    assert descending_ranks([0.2, 0.2, 0.5]) == [2.5, 2.5, 1]
    assert descending_ranks([0.5, math.nan, 0.7]) == [2, 3, 1]


def test_overall_score_by_hand_with_a_tie():
    # N = 3. OVERALL = 3 (overfit rank) + 2 (N+1 - acc rank) + 1.5 (loss rank) + 1 (N+1 - sens rank)
    #                  + 0.25 (N+1 - spec rank). P and Q tie on acc, sens and spec: average rank 1.5.
    # P: 3*3 + 2*(4-1.5) + 1.5*1 + 1*(4-1.5) + 0.25*(4-1.5) = 9 + 5 + 1.5 + 2.5 + 0.625 = 18.625
    # Q: 3*2 + 2*(4-1.5) + 1.5*3 + 1*(4-1.5) + 0.25*(4-1.5) = 6 + 5 + 4.5 + 2.5 + 0.625 = 18.625
    # R: 3*1 + 2*(4-3)   + 1.5*2 + 1*(4-3)   + 0.25*(4-3)   = 3 + 2 + 3   + 1   + 0.25  = 9.25
    scores = rank_scores(models(), Selection().terms).to_list()
    assert scores == [18.625, 18.625, 9.25]


@pytest.mark.parametrize("params_p, params_q, winner", [(5_000_000, 3_000_000, "Q"), (2_000_000, 3_000_000, "P")])
def test_tie_goes_to_fewer_parameters(params_p, params_q, winner):
    ranked = order(models(params_p, params_q), Selection())
    assert ranked["candidate"].to_list()[0] == winner
    assert ranked["candidate"].to_list()[-1] == "R"


def test_weights_are_configurable():
    only_loss = Selection(terms=[RankTerm("val/loss", 1.0, False)])
    assert order(models(), only_loss)["candidate"].to_list() == ["Q", "R", "P"]


def test_metric_rule_with_direction():
    frame = models()
    assert order(frame, Selection(rule="metric", metric="val/loss", direction="minimize"))["candidate"][0] == "Q"
    assert order(frame, Selection(rule="metric", metric="val/overfit", direction="maximize"))["candidate"][0] == "R"
    with pytest.raises(KeyError, match="val/mcc"):
        order(frame, Selection(rule="metric", metric="val/mcc"))


def test_t_interval():
    mean, half = t_interval([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    assert math.isnan(t_interval([0.5])[1])


def test_leaderboard_over_repeats_counts_first_places():
    rows = []
    # A wins repeats 0 and 1 on accuracy, B wins repeat 2.
    for r, (a, b) in enumerate([(0.9, 0.8), (0.85, 0.8), (0.7, 0.95)]):
        rows += [{"candidate": "A", "repeat": r, "params": 10, "val/acc": a},
                 {"candidate": "B", "repeat": r, "params": 20, "val/acc": b}]
    board = leaderboard(pl.DataFrame(rows), ["candidate"], ["val/acc"], Selection(rule="metric", metric="val/acc"))
    a = board.filter(pl.col("candidate") == "A").row(0, named=True)
    assert a["first_in_repeats"] == "2/3" and a["repeats"] == 3
    assert a["val/acc"] == pytest.approx((0.9 + 0.85 + 0.7) / 3)
    assert a["val/acc ±95%"] > 0
    assert board["rank"].to_list() == [1, 2]


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_nan_and_missing_are_the_worst_rank_in_either_direction(higher_is_better):
    got = points([0.3, math.nan, None, 0.1], higher_is_better)
    assert set(got[1:3]) == {1.5}  # the two missing values share the two worst places
    assert min(got[0], got[3]) == 3 and max(got[0], got[3]) == 4


def test_nan_overfit_never_scores_best():
    # Before: NaN -> -inf -> rank N on a lower-is-better term -> the highest overfit points.
    frame = models().with_columns(pl.Series("val/overfit", [math.nan, 0.10, 0.20]))
    scores = rank_scores(frame, [RankTerm("val/overfit", 1.0, False)]).to_list()
    assert scores[0] == 1 and scores[1] == 3


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_nan_never_wins_under_the_metric_rule(direction):
    frame = models().with_columns(pl.Series("val/mcc", [math.nan, 0.4, 0.6]))
    ranked = order(frame, Selection(rule="metric", metric="val/mcc", direction=direction))
    assert ranked["candidate"].to_list() == (["R", "Q", "P"] if direction == "maximize" else ["Q", "R", "P"])


def stage2(loss_order=("ce", "mse", "mae")) -> pl.DataFrame:
    # The demo sweep's trap: CE is best on accuracy and on the comparable NLL, but its own trained loss is
    # on a larger scale (CE 1.375 vs MSE 0.387 on identical logits), so ranking val/loss favours MSE.
    return pl.DataFrame({
        "optimizer": ["rmsprop"] * 3, "loss": list(loss_order),
        "val/overfit": [0.10, 0.10, 0.10], "val/acc": [0.833, 0.750, 0.700],
        "val/loss": [0.450, 0.120, 0.260], "val/nll": [0.420, 0.610, 0.700],
        "val/sensitivity": [0.8, 0.8, 0.8], "val/specificity": [0.8, 0.8, 0.8], "params": [10, 10, 10],
    })


def test_loss_term_ranks_nll_when_the_grid_varies_the_loss():
    auto = order(stage2(), Selection())
    assert auto["loss"][0] == "ce"
    terms, notes = resolve_terms(stage2(), Selection())
    assert [t.metric for t in terms if t.weight == 1.5] == ["val/nll"] and "val/nll" in notes[1]
    literal = order(stage2(), Selection(loss_term="trained"))
    assert literal["loss"][0] == "mse"  # the paper's literal rule, kept on request


def test_loss_term_keeps_the_trained_loss_when_one_loss_is_used():
    frame = models().with_columns(loss=pl.lit("ce"))
    terms, _ = resolve_terms(frame, Selection())
    assert "val/loss" in [t.metric for t in terms]
    assert "val/nll" in [t.metric for t in resolve_terms(frame, Selection(loss_term="nll"))[0]]


def test_overfit_term_uses_the_eval_mode_gap_when_measured():
    # Running (training-mode) gap says P overfits least; the eval-mode gap at the best checkpoint says R.
    frame = models().with_columns(pl.Series("train_eval/overfit", [0.30, 0.20, 0.00]))
    only_overfit = [RankTerm("val/overfit", 1.0, False)]
    assert order(frame, Selection(terms=only_overfit))["candidate"][0] == "R"
    assert order(frame, Selection(terms=only_overfit, overfit="running"))["candidate"][0] == "P"
    _, notes = resolve_terms(models(), Selection(terms=only_overfit))  # not measured: says so
    assert "no trial measured" in notes[0]


def repeat_trials() -> pl.DataFrame:
    # A survived 1 of 3 repeats with a lucky accuracy; B finished all 3.
    rows = [{"candidate": "A", "repeat": 0, "params": 10, "val/acc": 0.95}]
    rows += [{"candidate": "B", "repeat": r, "params": 20, "val/acc": v} for r, v in enumerate([0.80, 0.82, 0.81])]
    return pl.DataFrame(rows)


def test_grid_point_with_missing_repeats_is_incomplete_and_cannot_win():
    rule = Selection(rule="metric", metric="val/acc")
    board = leaderboard(repeat_trials(), ["candidate"], ["val/acc"], rule, expected_repeats=3)
    assert board["candidate"].to_list() == ["B", "A"]
    assert board["complete"].to_list() == [True, False]
    allowed = leaderboard(repeat_trials(), ["candidate"], ["val/acc"], Selection(rule="metric", allow_incomplete=True), 3)
    assert allowed["candidate"][0] == "A"
    scored = leaderboard(repeat_trials(), ["candidate"], ["val/acc"], Selection(terms=[RankTerm("val/acc", 1, True)]), 3)
    assert scored["candidate"][0] == "B"


def test_no_complete_grid_point_is_an_error_naming_the_key():
    with pytest.raises(SweepError, match="allow_incomplete"):
        leaderboard(repeat_trials().filter(pl.col("repeat") == 0), ["candidate"], ["val/acc"], Selection(rule="metric"), 3)


def test_trial_summary_carries_the_eval_mode_overfit_gap(tmp_path):
    import json

    from runs import files
    from sweeps.trials import summarize

    (tmp_path / files.METRICS).write_text("epoch,step,val/loss,val/acc,train/acc,val/overfit\n"
                                          "0,4,0.9,0.6,,\n0,4,,,0.7,0.1\n1,9,0.8,0.7,,\n1,9,,,0.95,0.25\n")
    (tmp_path / files.TRAIN_EVAL).write_text(json.dumps({"metrics": {"train_eval/acc": 0.75, "train_eval/overfit": 0.05}}))
    metrics = summarize(tmp_path, "best", "val/loss", "min")["metrics"]
    assert metrics["val/overfit"] == 0.25 and metrics["train_eval/overfit"] == 0.05
