"""Study 002's overall score, by hand from the paper's definition (section 2.4.2), and repeats."""

from __future__ import annotations

import math

import polars as pl
import pytest

from sweeps.config import RankTerm, Selection
from sweeps.ranking import descending_ranks, leaderboard, order, rank_scores, t_interval


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
    # "the highest value is always given a rank of 1, and the lowest value ... a rank of N"; ties share.
    assert descending_ranks([0.05, 0.10, 0.20]) == [3, 2, 1]
    assert descending_ranks([0.9, 0.9, 0.7]) == [1, 1, 3]
    assert descending_ranks([0.5, math.nan, 0.7]) == [2, 3, 1]


def test_overall_score_by_hand_with_a_tie():
    # N = 3. OVERALL = 3 (overfit rank) + 2 (N+1 - acc rank) + 1.5 (loss rank) + 1 (N+1 - sens rank)
    #                  + 0.25 (N+1 - spec rank)
    # P: 3*3 + 2*(4-1) + 1.5*1 + 1*(4-1) + 0.25*(4-1) = 9 + 6 + 1.5 + 3 + 0.75 = 20.25
    # Q: 3*2 + 2*(4-1) + 1.5*3 + 1*(4-1) + 0.25*(4-1) = 6 + 6 + 4.5 + 3 + 0.75 = 20.25
    # R: 3*1 + 2*(4-3) + 1.5*2 + 1*(4-3) + 0.25*(4-3) = 3 + 2 + 3   + 1 + 0.25 = 9.25
    scores = rank_scores(models(), Selection().terms).to_list()
    assert scores == [20.25, 20.25, 9.25]


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
