"""The grid of a sweep: each stage's keys, points, labels, title and plot, and the one slug of a run name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sweeps.config import SweepConfig

GRID_KEYS = ("candidate", "optimizer", "loss")  # every grid key of every stage, in leaderboard order


@dataclass(frozen=True)
class StageKind:
    """What a stage varies and how its results are shown.

    Attributes:
        keys: the grid keys of its points (leaderboard columns).
        title: its heading in report.md and on its plot.
        plot: its plot file in the sweep folder.
    """

    keys: tuple[str, ...]
    title: str
    plot: str


KINDS = {
    "stage1": StageKind(("candidate",), "Stage 1: base architecture", "stage1.png"),
    "stage2": StageKind(("optimizer", "loss"), "Stage 2: optimizer x loss", "stage2_heatmap.png"),
}


@dataclass
class Stage:
    """One stage of a sweep as an Optuna study.

    Attributes:
        name: "stage1" or "stage2".
        study_name: the study's name in the storage.
        grid: the parameters of every grid point (its keys, `repeat`, and `fold` under cross-validation).
        objective: the metric told to Optuna (and reported for pruning).
        direction: "minimize" or "maximize" for `objective`.
        rungs: under successive halving, the epochs at the end of each rung (`sweeps.schedule`); the grid
            then holds each run's `rung`, and grows as rungs promote points.
    """

    name: str
    study_name: str
    grid: list[dict[str, Any]]
    objective: str
    direction: str
    rungs: list[int] = field(default_factory=list)

    @property
    def kind(self) -> StageKind:
        return KINDS[self.name]

    @property
    def keys(self) -> tuple[str, ...]:
        return self.kind.keys

    @property
    def title(self) -> str:
        return self.kind.title

    @property
    def plot(self) -> str:
        return self.kind.plot

    @property
    def chooses_architecture(self) -> bool:
        """Stage 1 varies the network; stage 2 trains the stage-1 winner with each optimizer x loss."""
        return "candidate" in self.keys

    @property
    def param_names(self) -> list[str]:
        return list(self.grid[0]) if self.grid else []

    def key(self, params: dict[str, Any]) -> tuple:
        return tuple(params.get(k) for k in self.param_names)

    def search_space(self) -> dict[str, list[Any]]:
        space = {k: list(dict.fromkeys(p[k] for p in self.grid)) for k in self.param_names}
        if self.rungs:  # every rung from the start: Optuna keeps a parameter's choices fixed within a study
            space["rung"] = list(range(len(self.rungs)))
        return space

    def label(self, params: dict[str, Any]) -> str:
        """A grid point's name, e.g. 'resnet10t' or 'adam-ce'."""
        return point_label(params, self.keys)

    def run_label(self, params: dict[str, Any]) -> str:
        """A run's name within its stage: the grid point, its repeat and (under cross-validation) its fold."""
        fold = f"-f{params['fold']}" if params.get("fold") is not None else ""
        rung = f"-e{self.rungs[params['rung']]}" if params.get("rung") is not None and self.rungs else ""
        return f"{self.label(params)}-r{params['repeat']}{fold}{rung}"


def point_label(row: dict[str, Any], keys: tuple[str, ...] | list[str]) -> str:
    return "-".join(str(row[k]) for k in keys)


def slug(text: str, limit: int = 60) -> str:
    """`text` as a file name: runs of other characters than letters, digits, `_.-` become one `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:limit]


def fold_overrides(sweep: SweepConfig, fold: int | str) -> dict[str, Any]:
    """The fit overrides of one fold run (`fold`: 0..k-1, or "all" for the refit): the folds themselves are
    the data layer's (`data.split.folds` / `data.split.fold`)."""
    return {"data": {"split": {"folds": sweep.cv.folds, "fold": fold}}}


def objective(sweep: SweepConfig, run_cfg: dict[str, Any]) -> tuple[str, str]:
    """The metric told to Optuna (and used for pruning): the selection metric, or the run's monitor."""
    if sweep.selection.rule == "metric":
        return sweep.selection.metric, sweep.selection.direction
    run = run_cfg.get("run", {}) or {}
    return run.get("monitor", "val/loss"), "maximize" if run.get("mode") == "max" else "minimize"


def runs(sweep: SweepConfig, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run of the grid: each point once per repeat, and once per fold under cross-validation, in the
    order they are trained: breadth-first, fold 0 of every point, then fold 1, ..., so that every point's
    first folds finish early and can be compared (`sweeps.fold_stopping`)."""
    folds = [{"fold": f} for f in range(sweep.cv.k)] if sweep.cv.enabled else [{}]
    return [{**p, "repeat": r, **f} for r in range(sweep.repeats) for f in folds for p in points]


def stage1(sweep: SweepConfig, candidates: list[str], shared: dict[str, Any]) -> Stage:
    """Every candidate architecture, trained with the shared defaults (`shared`: their common fit config)."""
    metric, direction = objective(sweep, shared)
    grid = runs(sweep, [{"candidate": name} for name in candidates])
    return Stage("stage1", f"{sweep.name}/stage1", grid, metric, direction)


def stage2(sweep: SweepConfig, shared: dict[str, Any]) -> Stage:
    """Every optimizer x loss pair, trained on the stage-1 winner."""
    metric, direction = objective(sweep, shared)
    points = [{"optimizer": o, "loss": loss} for o in sweep.stage2.optimizers for loss in sweep.stage2.losses]
    return Stage("stage2", f"{sweep.name}/stage2", runs(sweep, points), metric, direction)


def stage_named(sweep: SweepConfig, name: str, candidates: list[str], shared: dict[str, Any]) -> Stage:
    """A stage rebuilt from its name (in a worker process)."""
    return stage1(sweep, candidates, shared) if name == "stage1" else stage2(sweep, shared)
