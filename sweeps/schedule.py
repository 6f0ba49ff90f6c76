"""Successive halving across a stage's candidates (`stage1.schedule` / `stage2.schedule`, Li et al. 2018).

Every grid point trains `min_epochs` (rung 0); the best ceil(n / eta) by the stage's selection rule (fold
means under cross-validation, judged on the rung's runs only) are promoted to `min_epochs * eta` epochs
(rung 1), and so on up to the trials' `max_epochs`. Rungs are grid points, like folds and repeats: a run's
grid parameters carry its `rung`, so the coordinator claims, retries and resumes rung runs exactly once,
with workers and after kill -9. Which points a rung promoted is recorded on the stage's study
(`rung<r>_promoted`), once: a rerun, another worker or another machine rebuilds the same grid from it.

A promoted run continues from its previous rung's run (`CONTINUES`), in that run's folder (shared by the
rung trials of one point, repeat and fold): the fit goes on from its `checkpoints/last.ckpt` (`runs.continuation`, the same continuation an
interrupted trial uses). Every rung but the last stops at its epochs with `run.until_epoch`, so the learning-
rate schedule, warm-up and early-stopping patience stay defined over `trainer.max_epochs`: a candidate
trained rung by rung ends where an uninterrupted run of the same seed would, and the last rung's config is
the exhaustive run's (so stage 2's default pair can reuse stage 1's winner, `sweeps.reuse`). A promoted run
whose previous rung left no checkpoint (another machine's disk) trains from epoch 0, and says so.

The leaderboard keeps each point's highest rung; points left at a lower rung show the rung they reached and
are ranked after the last rung's points (`sweeps.annotate`), so they never win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runs import files
from runs.files import RunFiles
from sweeps import coordinator as coord
from sweeps import selection
from sweeps.budget import max_epochs_of, rungs, survivors
from sweeps.config import Schedule, SweepConfig
from sweeps.grid import Stage

# A promoted run continues from its previous rung's checkpoint (the plan counts each epoch once).
CONTINUES = True
# The previous rung's results that a continued run rewrites when it ends; removed when it takes the folder
# on, so that nothing stale is read if it stops early (its progress lines would be shown again, too).
STALE = (files.PROGRESS, files.PRUNED, files.TRAIN_EVAL, files.VAL_PREDICTIONS, files.TIMING)
PROMOTED = "rung{}_promoted"  # study user attr: the grid points (their keys) promoted to rung r


def stage_schedule(sweep: SweepConfig, stage: Stage) -> Schedule:
    return (sweep.stage1 if stage.chooses_architecture else sweep.stage2).schedule


def set_rungs(sweep: SweepConfig, stage: Stage, configs: Any) -> Stage:
    """Give a successive-halving stage its rungs: its grid becomes rung 0 of every run."""
    schedule = stage_schedule(sweep, stage)
    if schedule.kind != "successive_halving" or stage.rungs:  # exhaustive, or given its rungs already
        return stage
    stage.rungs = rungs(schedule, max_epochs_of(configs))
    if len(stage.rungs) > 1:
        stage.grid = [{**p, "rung": 0} for p in stage.grid]
    else:
        stage.rungs = []
    return stage


def rung_epochs(stage: Stage, params: dict[str, Any], max_epochs: int) -> int | None:
    """The epochs a rung run has done when it ends (None: not a rung run): its rung's, at most max_epochs."""
    if params.get("rung") is None or not stage.rungs:
        return None
    return min(stage.rungs[int(params["rung"])], max_epochs)


def rung_overrides(stage: Stage, params: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    """The fit overrides of a rung run: stop after its rung's epochs (`run.until_epoch`), except at the end."""
    epochs = rung_epochs(stage, params, max_epochs)
    return {} if epochs is None or epochs >= max_epochs else {"run": {"until_epoch": epochs}}


def previous_rung(ss: coord.StageStudy, sweep_dir: Path, params: dict[str, Any]) -> str | None:
    """The run folder (relative to the sweep folder) of the same point, repeat and fold at the previous rung,
    if it finished and its checkpoint is here."""
    rung = params.get("rung")
    if not rung:
        return None
    key = ss.stage.key({**params, "rung": int(rung) - 1})
    for t in coord.finished(ss.study):
        if ss.stage.key(coord.grid_params(t)) == key and t.user_attrs.get("run_dir"):
            relative = t.user_attrs["run_dir"]
            return relative if RunFiles(Path(sweep_dir) / relative).last_checkpoint.is_file() else None
    return None


def start_from(run_dir: Path) -> None:
    """Prepare the previous rung's run folder to be continued in place.

    In place, neither copied nor moved: Lightning's `ModelCheckpoint` restores its best score only when its
    folder is the one it saved from, so a continued run elsewhere would forget which epoch was best. The
    previous rung's trial keeps its recorded results (the promotion has used them) and shares the folder.
    """
    for name in STALE:
        (run_dir / name).unlink(missing_ok=True)


def _point(stage: Stage, params: dict[str, Any]) -> tuple:
    return tuple(params.get(k) for k in stage.keys)


def _runs_of(stage: Stage, points: list[tuple], rung: int) -> list[dict[str, Any]]:
    """The rung runs of `points`: every repeat and fold of each, in the grid's breadth-first order."""
    base = [p for p in stage.grid if p.get("rung") == 0 and _point(stage, p) in set(points)]
    return [{**p, "rung": rung} for p in base]


def restore(ss: coord.StageStudy) -> None:
    """Extend the stage's grid with the rungs its study already promoted (a rerun, a worker)."""
    stage = ss.stage
    for rung in range(1, len(stage.rungs)):
        promoted = ss.study.user_attrs.get(PROMOTED.format(rung))
        if promoted is None:
            return
        have = {stage.key(p) for p in stage.grid}
        stage.grid += [p for p in _runs_of(stage, [tuple(x) for x in promoted], rung) if stage.key(p) not in have]


def promote(sweep: SweepConfig, ss: coord.StageStudy, rung: int) -> list[tuple]:
    """Promote the best of rung `rung` to rung `rung + 1` (once: an earlier promotion is kept) and add their
    runs to the grid. Returns the promoted points."""
    stage = ss.stage
    recorded = ss.study.user_attrs.get(PROMOTED.format(rung + 1))
    if recorded is None:
        ranked = selection.rung_board(sweep, ss, rung)
        n_points = len({_point(stage, p) for p in stage.grid if p.get("rung") == 0})
        keep = survivors(n_points, stage_schedule(sweep, stage).eta, rung + 1)
        complete = [r for r in ranked.iter_rows(named=True) if r.get("complete", True) and not r.get("note", "").startswith("stopped")]
        recorded = [[r[k] for k in stage.keys] for r in complete[:keep]]
        ss.study.set_user_attr(PROMOTED.format(rung + 1), recorded)
    restore(ss)
    return [tuple(x) for x in recorded]


def promotion_line(stage: Stage, rung: int, promoted: list[tuple]) -> str:
    names = ", ".join("-".join(map(str, p)) for p in promoted)
    ranked = len({_point(stage, p) for p in stage.grid if p.get("rung") == rung})
    return (f"[sweep] {stage.name}: rung {rung + 1}/{len(stage.rungs)} ({stage.rungs[rung]} epochs) done; "
            f"promoted {len(promoted)} of {ranked} to {stage.rungs[rung + 1]} epochs: {names}")
