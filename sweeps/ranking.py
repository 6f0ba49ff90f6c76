"""Selection rules over a stage's finished trials, and aggregation over repeats.

Study 002 (section 2.4.2): every model of a stage is ranked on each metric, "the highest value is always
given a rank of 1, and the lowest value is always given a rank of N", and

    OVERALL = 3 (overfit rank) + 2 (N+1 - accuracy rank) + 1.5 (loss rank)
              + 1 (N+1 - sensitivity rank) + 0.25 (N+1 - specificity rank)

The highest overall score wins; a tie goes to the model with fewer parameters. Because the score of a
model depends on all others, it is computed here, after the trials, from the metrics stored on each trial.

Where the paper's rule is ambiguous or breaks at the edges this module decides, and says so:
- equal values get the average of the ranks they span (scipy's "average"), so the lowest value keeps
  "a rank of N" on average and a tie moves no one else;
- a missing or NaN metric is the worst rank of its term, whichever direction the term has;
- the loss term ranks `val/nll` when the stage's grid varies the loss (`Selection.loss_term`);
- the overfit term uses eval-mode training accuracy at the best checkpoint (`Selection.overfit`);
- a grid point with fewer repeats than expected is marked incomplete and cannot win
  (`Selection.allow_incomplete`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import polars as pl

from errors import SweepError
from sweeps.config import RankTerm, Selection

EVAL_TRAIN_ACC = "train_eval/acc"  # written by runs.callbacks.TrainEvalWriter into train_eval.json
EVAL_OVERFIT = "train_eval/overfit"  # eval-mode train accuracy - val accuracy, both at the best checkpoint


def _clean(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def points(values: list[float | None], higher_is_better: bool) -> np.ndarray:
    """Average ranks from worst (1) to best (N); NaN/None is the worst whatever the direction.

    For a higher-is-better term this is the paper's N+1 - rank; for a lower-is-better one its rank (rank 1 =
    highest value), so `weight * points` is every term's contribution to the overall score.
    """
    from scipy.stats import rankdata  # here, not at import: scipy.stats costs the sweep's start-up ~0.5 s

    v = _clean(values)
    goodness = np.where(np.isnan(v), -np.inf, v if higher_is_better else -v)
    return rankdata(goodness, method="average")


def descending_ranks(values: list[float | None]) -> list[float]:
    """The paper's ranks: 1 for the highest value, N for the lowest; ties get the average of the ranks they
    span; NaN/None ranks last (N)."""
    n = len(values)
    return [float(n + 1 - p) for p in points(values, higher_is_better=True)]


def losses_vary(frame: pl.DataFrame) -> bool:
    """Whether the models in `frame` were trained with different losses (stage 2's grid)."""
    return "loss" in frame.columns and frame["loss"].n_unique() > 1


def resolve_terms(frame: pl.DataFrame, selection: Selection) -> tuple[list[RankTerm], list[str]]:
    """The rank-score terms actually used on `frame`, and one sentence per substitution for the report.

    `val/loss` becomes `val/nll` under `loss_term: nll`, or under `auto` when the losses vary (each loss
    has its own scale: on identical logits CE logs 1.375 and MSE 0.387, so the trained loss ranks MSE best
    by construction). `val/overfit` becomes the eval-mode gap under `overfit: eval` when the trials
    measured it.
    """
    terms, notes = [], []
    use_nll = selection.loss_term == "nll" or (selection.loss_term == "auto" and losses_vary(frame))
    for term in selection.terms:
        if term.metric == "val/loss" and use_nll:
            term = replace(term, metric="val/nll")
            why = "the grid varies the loss" if selection.loss_term == "auto" else "selection.loss_term: nll"
            notes.append(f"The loss term ranks `val/nll` (cross-entropy of the predicted probabilities, "
                         f"comparable across losses) because {why}.")
        elif term.metric == "val/loss":
            notes.append("The loss term ranks each trial's own training loss `val/loss`"
                         + (" (selection.loss_term: trained, the paper's literal rule; losses of different "
                            "kinds are on different scales)." if losses_vary(frame) else "."))
        if term.metric == "val/overfit" and selection.overfit == "eval":
            if EVAL_OVERFIT in frame.columns:
                term = replace(term, metric=EVAL_OVERFIT)
                notes.append("The overfit term ranks eval-mode training accuracy minus validation accuracy, "
                             "both measured at the selected checkpoint (`train_eval/overfit`).")
            else:
                notes.append("The overfit term ranks the running training-mode accuracy minus validation "
                             "accuracy (`val/overfit`): no trial measured eval-mode training accuracy.")
        elif term.metric == "val/overfit":
            notes.append("The overfit term ranks the running training-mode accuracy minus validation accuracy "
                         "(`val/overfit`, selection.overfit: running, the paper's).")
        terms.append(term)
    return terms, notes


def rank_scores(frame: pl.DataFrame, terms: list[RankTerm]) -> pl.Series:
    """Study 002's overall score for each row of `frame` (one row per model, one column per metric)."""
    score = np.zeros(frame.height)
    for term in terms:
        if term.metric not in frame.columns:
            raise KeyError(f"rank score needs '{term.metric}' but the trials logged {sorted(frame.columns)}")
        score += term.weight * points(frame[term.metric].cast(pl.Float64).to_list(), term.higher_is_better)
    return pl.Series("rank_score", score)


def order(frame: pl.DataFrame, selection: Selection) -> pl.DataFrame:
    """Sort models best first by the selection rule; ties go to fewer parameters (column `params`).

    Rows with `complete == False` (missing repeats) sort after every complete row unless
    `selection.allow_incomplete`; NaN metrics sort last in either direction.
    """
    if selection.rule == "rank_score":
        terms, _ = resolve_terms(frame, selection)
        frame = frame.with_columns(rank_score=rank_scores(frame, terms))
        by, descending = ["rank_score", "params"], [True, False]
    else:
        if selection.metric not in frame.columns:
            raise KeyError(f"selection.metric '{selection.metric}' was not logged; available: {sorted(frame.columns)}")
        # polars orders NaN above every number, so NaN would come first under maximize: make it null.
        key = pl.col(selection.metric).cast(pl.Float64).fill_nan(None).alias("__key")
        frame = frame.with_columns(key)
        by, descending = ["__key", "params"], [selection.direction == "maximize", False]
    if "complete" in frame.columns and not selection.allow_incomplete:
        by, descending = ["complete", *by], [True, *descending]
    return frame.sort(by, descending=descending, nulls_last=True).drop("__key", strict=False)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-interval over repeats (NaN half-width for a single value)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(arr) == 0:
        return math.nan, math.nan
    if len(arr) == 1:
        return float(arr[0]), math.nan
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr))
    return float(arr.mean()), float(half)


def leaderboard(
    trials: pl.DataFrame, keys: list[str], metrics: list[str], selection: Selection, expected_repeats: int | None = None,
) -> pl.DataFrame:
    """Aggregate finished trials (one row per trial, columns keys + repeat + metrics + params) into a
    leaderboard: one row per grid point with the mean and 95% interval of each metric over repeats, the
    selection score on the means, and how often the point ranked first when each repeat is ranked alone.

    Args:
        trials: the stage's COMPLETE trials.
        keys: grid-point columns (candidate; optimizer, loss).
        metrics: metric columns to aggregate (the selection's own are added).
        selection: the winner rule.
        expected_repeats: repeats every grid point should have; points with fewer are `complete: false`
            and cannot win unless `selection.allow_incomplete` (None: no check).

    Raises:
        SweepError: no grid point is complete and incomplete ones may not win.
    """
    if trials.is_empty():
        return pl.DataFrame()
    terms, _ = resolve_terms(trials, selection)
    wanted = [*metrics, *(t.metric for t in terms if selection.rule == "rank_score"),
              *([selection.metric] if selection.rule == "metric" else [])]
    metrics = [m for m in dict.fromkeys(wanted) if m in trials.columns]
    agg = trials.group_by(keys, maintain_order=True).agg(
        pl.len().alias("repeats"), pl.col("params").first(), *[pl.col(m) for m in metrics],
    )
    rows = []
    for row in agg.iter_rows(named=True):
        out = {k: row[k] for k in keys} | {"repeats": row["repeats"], "params": row["params"]}
        if expected_repeats is not None:
            out["complete"] = row["repeats"] >= expected_repeats
        for m in metrics:
            mean, half = t_interval(row[m])
            out[m] = mean
            out[f"{m} ±95%"] = half
        rows.append(out)
    board = pl.DataFrame(rows)
    if expected_repeats is not None and not selection.allow_incomplete and not board["complete"].any():
        raise SweepError(
            f"no grid point finished all {expected_repeats} repeats (failed or pruned trials), so none may win. "
            "Rerun the sweep (with retry_failed: true to retry errors) or set selection.allow_incomplete: true."
        )
    board = order(board, selection)
    wins = {tuple(r[k] for k in keys): 0 for r in rows}
    for _, per_repeat in trials.group_by("repeat", maintain_order=True):
        best = order(per_repeat, selection).row(0, named=True)
        wins[tuple(best[k] for k in keys)] += 1
    n_rep = trials["repeat"].n_unique()
    board = board.with_columns(
        pl.Series("first_in_repeats", [f"{wins[tuple(r[k] for k in keys)]}/{n_rep}" for r in board.iter_rows(named=True)]),
    )
    return board.with_row_index("rank", offset=1)
