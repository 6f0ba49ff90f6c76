"""Selection: a stage's finished trials as a table, its leaderboard by the selection rule, and the winner,
as the typed `StageResult` and `Winner` that the outputs read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import polars as pl
from optuna.trial import FrozenTrial, TrialState

from errors import SweepError
from sweeps import annotate, budget, compare, crossval, ranking
from sweeps import coordinator as coord
from sweeps.config import SweepConfig
from sweeps.grid import Stage

LEADERBOARD_METRICS = [
    "val/acc", "val/loss", "val/nll", "val/overfit", "val/sensitivity", "val/specificity", "val/precision", "val/f1",
    "val/mcc", "val/auroc", "val/balanced_acc", "train/acc",
]


@dataclass
class StageResult:
    """A finished stage: its study, its finished trials (one row each) and its leaderboard (best first)."""

    stage: Stage
    study: optuna.Study
    trials: pl.DataFrame
    board: pl.DataFrame
    budget_limited: bool = False

    @property
    def best(self) -> dict[str, Any]:
        """The leaderboard's first row: the stage's winning grid point."""
        return self.board.row(0, named=True)


@dataclass
class Winner:
    """The sweep's choice and how it was reached: what winner.json records (`to_json`).

    Attributes:
        sweep: the sweep's name.
        incomplete: grid points of either stage without a finished trial (only with `allow_failures`).
        base_architecture, optimizer, loss: the winning configuration.
        trial: the winner's best run (under CV: its best fold run); `run_dir` relative to the sweep folder.
        params: its number of parameters.
        selection: the selection rule.
        val: its validation metrics (under CV: the fold means).
        winner_elsewhere: its run was trained by a sweep command on another machine.
        cv: under cross-validation, the folds, the final model and its refit epochs or ensemble members.
        test: its test metrics, once tested.
    """

    sweep: str
    incomplete: list[dict[str, str]]
    base_architecture: str
    optimizer: str
    loss: str
    trial: int
    run_dir: str
    params: int
    selection: str
    val: dict[str, float]
    winner_elsewhere: bool = False
    budget_limited: bool = False
    cv: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    runs: pl.DataFrame = field(default_factory=pl.DataFrame, repr=False)  # its runs, best first (not in JSON)

    @property
    def ensemble(self) -> bool:
        return (self.cv or {}).get("final") == "ensemble"

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("sweep", "incomplete", "base_architecture", "optimizer", "loss", "trial",
                                             "run_dir", "params", "selection", "val")}
        if self.winner_elsewhere:
            out["winner_elsewhere"] = True
        if self.budget_limited:
            out["budget_limited"] = True
        out.update({k: getattr(self, k) for k in ("cv", "test") if getattr(self, k) is not None})
        return out


def _reachable_run_dir(out: Path, trial: FrozenTrial) -> str | None:
    """A trial's run directory as this process reaches it: relative to this sweep folder, or, for a trial that
    another sweep command (another output folder on this machine or on a shared file system) trained, the
    absolute path recorded with it. A run on another machine's own disk stays relative and unreachable."""
    relative = trial.user_attrs.get("run_dir")
    elsewhere = trial.user_attrs.get("sweep_dir")
    if relative is None or (out / relative).exists() or not elsewhere or not (Path(elsewhere) / relative).exists():
        return relative
    return str(Path(elsewhere) / relative)


def trial_frame(study: optuna.Study, stage: Stage, out: Path = Path("."), rung: int | None = None) -> pl.DataFrame:
    """One row per finished (COMPLETE) trial: grid keys, repeat, fold, metrics, params, run dir (relative to
    the sweep folder `out`, or absolute for a trial trained in another folder, see `_reachable_run_dir`)."""
    rows = []
    grid = {stage.key(p) for p in stage.grid}
    for t in coord.finished(study):
        p = coord.grid_params(t)
        if stage.key(p) not in grid:  # a trial of an earlier grid of this study (e.g. other repeats)
            continue
        rows.append({**{k: p[k] for k in stage.keys}, "repeat": p["repeat"], "fold": p.get("fold"), **_rung(p),
                     "trial": t.number, "params": t.user_attrs.get("params", 0), "run_dir": _reachable_run_dir(out, t),
                     "epoch": t.user_attrs.get("epoch"), **t.user_attrs.get("metrics", {})})
    frame = pl.DataFrame(rows) if rows else pl.DataFrame()
    if rung is not None and not frame.is_empty():
        return frame.filter(pl.col("rung") == rung).drop("rung")
    if "rung" in frame.columns:  # successive halving: each point judged by its highest rung's runs
        frame = frame.filter(pl.col("rung") == pl.col("rung").max().over(list(stage.keys))).drop("rung")
    return frame


def _rung(params: dict[str, Any]) -> dict[str, int]:
    return {"rung": int(params["rung"])} if params.get("rung") is not None else {}


def rung_board(sweep: SweepConfig, ss: coord.StageStudy, rung: int) -> pl.DataFrame:
    """The leaderboard of one successive-halving rung's runs (by the selection rule; fold means under CV),
    with the fold-stopping notes: what promotion ranks."""
    frame = trial_frame(ss.study, ss.stage, sweep.out_dir, rung=rung)
    if frame.is_empty():
        return frame
    _, board = _leaderboard(sweep, ss.stage, frame, check_repeats=True)
    return annotate.annotate(board, ss.study, ss.stage)


def _leaderboard(sweep: SweepConfig, stage: Stage, frame: pl.DataFrame, check_repeats: bool = True
                 ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The stage's samples (under CV one per fold) and their leaderboard by the selection rule."""
    metrics = [m for m in LEADERBOARD_METRICS if m in frame.columns]
    samples = crossval.as_samples(frame, list(stage.keys), sweep.cv.k, sweep.repeats)
    expected = (sweep.cv.k or sweep.repeats) if check_repeats else None
    return samples, ranking.leaderboard(samples, list(stage.keys), metrics, sweep.selection, expected_repeats=expected)


def stage_result(sweep: SweepConfig, ss: coord.StageStudy) -> StageResult:
    """The stage's finished trials and leaderboard, with the paired comparisons against its winner.

    Raises:
        SweepError: no trial of the stage finished.
    """
    stage = ss.stage
    frame = trial_frame(ss.study, stage, sweep.out_dir)
    if frame.is_empty() and budget.stage_limited(ss.study):
        raise SweepError(f"{stage.name}: the budget ran out before any run of this stage was trained, so there is no "
                         "winner; raise budget.hours (the plan printed at the start says what the sweep needs)")
    if frame.is_empty():
        failed = [f"trial {t.number}: {t.user_attrs.get('fail_reason')}" for t in ss.study.get_trials(states=(TrialState.FAIL,))]
        raise SweepError(f"{stage.name}: no trial finished, so there is no winner. Failures:\n  " + "\n  ".join(failed[:20]))
    limited = budget.stage_limited(ss.study)
    if limited:  # the budget ran out mid-stage: the best point so far, ranked on the runs it finished
        sweep = replace(sweep, selection=replace(sweep.selection, allow_incomplete=True))
    samples, board = _leaderboard(sweep, stage, frame)
    board = annotate.annotate(board, ss.study, stage, stage.rungs or None)
    keys = list(stage.keys)
    oof = crossval.out_of_fold(frame, board, keys, stage.name, sweep.out_dir) if sweep.cv.enabled else None
    board = compare.compare_stage(samples, board, keys, sweep.selection.rule, sweep.selection.metric, sweep.out_dir,
                                  oof=oof)
    return StageResult(stage, ss.study, frame, board, budget_limited=limited)


def leader(sweep: SweepConfig, ss: coord.StageStudy) -> str:
    """The stage's leader so far by its selection rule, over the trials finished so far, naming what it ranks
    by: e.g. 'val/mcc=0.8123 (adam-ce)' or 'rank_score=11.50 (rmsprop-ce)' ('' before any trial finished)."""
    frame = trial_frame(ss.study, ss.stage, sweep.out_dir)
    if frame.is_empty():
        return ""
    try:
        _, board = _leaderboard(sweep, ss.stage, frame, check_repeats=False)
    except (KeyError, SweepError):  # e.g. a rank-score metric not logged: the stage's own ranking says so, once
        return ""
    best = board.row(0, named=True)
    score = "rank_score" if sweep.selection.rule == "rank_score" else sweep.selection.metric
    value = best.get(score)
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"{score}={shown} ({ss.stage.label(best)})"


def pick_winner(sweep: SweepConfig, first: StageResult, second: StageResult, incomplete: list[dict[str, str]]
                ) -> Winner:
    """The winner: stage 2's best grid point on stage 1's best architecture, and its best run."""
    base, best = first.best["candidate"], second.best
    runs = second.trials.filter((pl.col("optimizer") == best["optimizer"]) & (pl.col("loss") == best["loss"]))
    # NaN as null: polars orders NaN above every number, so it would come first under maximize
    runs = runs.sort(pl.col(second.stage.objective).cast(pl.Float64).fill_nan(None),
                     descending=second.stage.direction == "maximize", nulls_last=True)
    row = runs.row(0, named=True)
    val_from = best if sweep.cv.enabled else row  # under CV: the fold means
    return Winner(
        sweep=sweep.name, incomplete=incomplete, base_architecture=base, optimizer=best["optimizer"],
        loss=best["loss"], trial=int(row["trial"]), run_dir=str(row["run_dir"]), params=int(row["params"]),
        selection=sweep.selection.rule, budget_limited=first.budget_limited or second.budget_limited,
        val={k: v for k, v in val_from.items() if k.startswith(("val/", "train/", "train_eval/")) and "±" not in k},
        runs=runs,
    )
