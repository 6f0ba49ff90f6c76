"""What a leaderboard's own numbers say the report must conclude about its winner."""

from __future__ import annotations

import math
import re

import polars as pl


def _includes_zero(low: float | None, high: float | None) -> bool:
    return low is None or math.isnan(low) or low <= 0.0 <= high


def _fold_interval(text: str | None) -> tuple[float, float] | None:
    """The interval of a `vs_winner_folds` cell, '+0.012 [-0.020, +0.044]'."""
    found = re.search(r"\[([-+0-9.e]+), ([-+0-9.e]+)\]", text or "")
    return (float(found[1]), float(found[2])) if found else None


def expected_verdict(board: pl.DataFrame) -> str:
    """The sentence the report must hold for this stage, decided from the difference intervals themselves:
    some candidate's 95% interval (paired bootstrap, or under CV also the corrected t-test across folds)
    includes 0 -> the data cannot separate the winner; none does and none is better -> the winner is better
    than every other candidate; else a candidate scored better on the compared metric."""
    rows = list(board.iter_rows(named=True))[1:]
    ties, better = [], []
    for r in rows:
        intervals = [(r["vs_winner_low"], r["vs_winner_high"])]
        if (folds := _fold_interval(r.get("vs_winner_folds"))) is not None:
            intervals.append(folds)
        if any(_includes_zero(low, high) for low, high in intervals):
            ties.append(r)
        elif r["vs_winner_high"] < 0:
            better.append(r)
    if ties:
        return "cannot separate the winner"
    return "scored better than the winner" if better else "better than every other candidate"


def assert_verdicts(out, report: str) -> None:
    """Each stage's leaderboard marks its candidates as its intervals say, and the report concludes so."""
    for stage in ("stage1", "stage2"):
        board = pl.read_parquet(out / f"{stage}_leaderboard.parquet")
        for r in list(board.iter_rows(named=True))[1:]:
            if r.get("vs_winner_folds") is None:  # without CV the flag is the bootstrap interval's alone
                assert r["indistinguishable"] == _includes_zero(r["vs_winner_low"], r["vs_winner_high"]), (stage, r)
        expected = expected_verdict(board)
        section = report.split("## Stage 1")[1].split("## Stage 2")[0] if stage == "stage1" else report.split("## Stage 2")[1].split("## Winner")[0]
        assert expected in section, f"{stage}: expected '{expected}' from its intervals"
