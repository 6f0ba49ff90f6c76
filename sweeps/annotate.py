"""What the leaderboard says about how each grid point was (or was not) trained: reused from an identical
finished run (`sweeps.reuse`), stopped early across folds (`sweeps.fold_stopping`), not trained for lack
of budget (`sweeps.budget`), and the successive-halving rung it reached (`sweeps.schedule`). One `note`
column per leaderboard row (and a `rung` column under successive halving); points stopped early or not
promoted to the last rung are ranked after every other point, so they never win."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import optuna
import polars as pl
from optuna.trial import TrialState

from sweeps import coordinator as coord
from sweeps.budget import BUDGET_LIMITED
from sweeps.fold_stopping import STOPPED
from sweeps.grid import Stage
from sweeps.reuse import REUSED_FROM


def _reused_text(origins: list[str]) -> str:
    if len(origins) == 1:
        return f"reused from {origins[0]}"
    points = sorted({o.rsplit("-r", 1)[0] for o in origins})
    return f"reused from {', '.join(points)} ({len(origins)} runs)"


def point_notes(study: optuna.Study, stage: Stage) -> dict[tuple, dict[str, Any]]:
    """Per grid point (its stage keys): reused origins, stop reason, budget-limited runs, highest rung."""
    notes: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"reused": [], "stopped": "", "budget": 0, "rung": None})
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("duplicate_of") is not None:
            continue
        params = coord.grid_params(t)
        note = notes[tuple(params.get(k) for k in stage.keys)]
        if t.state == TrialState.COMPLETE and t.user_attrs.get(REUSED_FROM):
            note["reused"].append(t.user_attrs[REUSED_FROM])
        if t.state == TrialState.PRUNED and t.user_attrs.get(STOPPED):
            note["stopped"] = note["stopped"] or t.user_attrs[STOPPED]
        if t.state == TrialState.PRUNED and t.user_attrs.get(BUDGET_LIMITED):
            note["budget"] += 1
        if t.state == TrialState.COMPLETE and params.get("rung") is not None:
            note["rung"] = max(note["rung"] or 0, int(params["rung"]))
    return notes


def note_text(note: dict[str, Any], rungs: list[int] | None) -> str:
    parts = []
    if note["rung"] is not None and rungs:
        last = len(rungs) - 1
        epochs = rungs[note["rung"]]
        reached = f"rung {note['rung'] + 1}/{len(rungs)} ({epochs} epoch{'s' * (epochs != 1)})"
        parts.append(reached if note["rung"] == last else f"{reached}: not promoted (only the best of its rung went on)")
    if note["stopped"]:
        parts.append(note["stopped"])
    if note["budget"]:
        parts.append(f"budget-limited: {note['budget']} run{'s' * (note['budget'] != 1)} not trained")
    if note["reused"]:
        parts.append(_reused_text(sorted(set(note["reused"]))))
    return "; ".join(parts)


def annotate(board: pl.DataFrame, study: optuna.Study, stage: Stage, rungs: list[int] | None = None) -> pl.DataFrame:
    """The leaderboard with its `note` column (and `rung` under successive halving), points stopped early
    or left at a lower rung moved after the others (their `complete` set to false)."""
    if board.is_empty():
        return board
    notes = point_notes(study, stage)
    keys = list(stage.keys)
    rows = [notes.get(tuple(r[k] for k in keys)) or {"reused": [], "stopped": "", "budget": 0, "rung": None}
            for r in board.iter_rows(named=True)]
    last = len(rungs) - 1 if rungs else None
    behind = [bool(n["stopped"]) or (last is not None and n["rung"] is not None and n["rung"] < last) for n in rows]
    out = board.with_columns(pl.Series("note", [note_text(n, rungs) for n in rows], dtype=pl.String))
    if rungs:
        out = out.with_columns(pl.Series("rung", [None if n["rung"] is None else n["rung"] + 1 for n in rows],
                                         dtype=pl.Int64))
    if not any(behind):
        return out
    if "complete" in out.columns:
        out = out.with_columns(complete=pl.col("complete") & ~pl.Series(behind))
    out = out.with_columns(pl.Series("__behind", behind)).sort("__behind", maintain_order=True).drop("__behind")
    return out.drop("rank").with_row_index("rank", offset=1) if "rank" in out.columns else out


def report_notes(board: pl.DataFrame, keys: list[str], budget_limited: bool) -> list[str]:
    """The report's sentences on how the points were trained: why each one stopped, what was reused."""
    out = []
    if budget_limited:
        out.append("**Budget-limited**: the budget ran out before every run of this stage was trained; the winner is "
                   "the best point so far, ranked on the runs it finished (a point that was not trained to the end "
                   "might have caught up).")
    if "note" not in board.columns:
        return out
    for row in board.iter_rows(named=True):
        if row["note"]:
            out.append(f"**{'-'.join(str(row[k]) for k in keys)}**: {row['note']}.")
    return out
