"""Selection rules over a stage's finished trials, and aggregation over repeats.

Study 002 (section 2.4.2): every model of a stage is ranked on each metric, "the highest value is always
given a rank of 1, and the lowest value is always given a rank of N", and

    OVERALL = 3 (overfit rank) + 2 (N+1 - accuracy rank) + 1.5 (loss rank)
              + 1 (N+1 - sensitivity rank) + 0.25 (N+1 - specificity rank)

The highest overall score wins; a tie goes to the model with fewer parameters. Equal metric values share
the best (smallest) rank of their group, as spreadsheet RANK does. Because the score of a model depends on
all others, it is computed here, after the trials, from the metrics stored on each trial.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from sweeps.config import RankTerm, Selection


def descending_ranks(values: list[float]) -> list[int]:
    """Rank 1 for the highest value, N for the lowest; ties share the smallest rank; NaN ranks last."""
    clean = [(-math.inf if v is None or math.isnan(v) else v) for v in values]
    return [1 + sum(other > v for other in clean) for v in clean]


def rank_scores(frame: pl.DataFrame, terms: list[RankTerm]) -> pl.Series:
    """Study 002's overall score for each row of `frame` (one row per model, one column per metric)."""
    n = frame.height
    score = np.zeros(n)
    for term in terms:
        if term.metric not in frame.columns:
            raise KeyError(f"rank score needs '{term.metric}' but the trials logged {sorted(frame.columns)}")
        ranks = np.array(descending_ranks(frame[term.metric].cast(pl.Float64).to_list()))
        score += term.weight * ((n + 1 - ranks) if term.higher_is_better else ranks)
    return pl.Series("rank_score", score)


def order(frame: pl.DataFrame, selection: Selection) -> pl.DataFrame:
    """Sort models best first by the selection rule; ties go to fewer parameters (column `params`)."""
    if selection.rule == "rank_score":
        frame = frame.with_columns(rank_score=rank_scores(frame, selection.terms))
        return frame.sort(["rank_score", "params"], descending=[True, False], nulls_last=True)
    if selection.metric not in frame.columns:
        raise KeyError(f"selection.metric '{selection.metric}' was not logged; available: {sorted(frame.columns)}")
    return frame.sort([selection.metric, "params"], descending=[selection.direction == "maximize", False], nulls_last=True)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-interval over repeats (NaN half-width for a single value)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(arr) == 0:
        return math.nan, math.nan
    if len(arr) == 1:
        return float(arr[0]), math.nan
    from scipy import stats  # here, not at import: scipy.stats costs the sweep's start-up ~0.5 s

    half = stats.t.ppf(0.5 + level / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr))
    return float(arr.mean()), float(half)


def leaderboard(trials: pl.DataFrame, keys: list[str], metrics: list[str], selection: Selection) -> pl.DataFrame:
    """Aggregate finished trials (one row per trial, columns keys + repeat + metrics + params) into a
    leaderboard: one row per grid point with the mean and 95% interval of each metric over repeats, the
    selection score on the means, and how often the point ranked first when each repeat is ranked alone.
    """
    if trials.is_empty():
        return pl.DataFrame()
    agg = trials.group_by(keys, maintain_order=True).agg(
        pl.len().alias("repeats"), pl.col("params").first(), *[pl.col(m) for m in metrics],
    )
    rows = []
    for row in agg.iter_rows(named=True):
        out = {k: row[k] for k in keys} | {"repeats": row["repeats"], "params": row["params"]}
        for m in metrics:
            mean, half = t_interval(row[m])
            out[m] = mean
            out[f"{m} ±95%"] = half
        rows.append(out)
    board = order(pl.DataFrame(rows), selection)
    wins = {tuple(r[k] for k in keys): 0 for r in rows}
    for _, per_repeat in trials.group_by("repeat", maintain_order=True):
        best = order(per_repeat, selection).row(0, named=True)
        wins[tuple(best[k] for k in keys)] += 1
    n_rep = trials["repeat"].n_unique()
    board = board.with_columns(
        pl.Series("first_in_repeats", [f"{wins[tuple(r[k] for k in keys)]}/{n_rep}" for r in board.iter_rows(named=True)]),
    )
    return board.with_row_index("rank", offset=1)
