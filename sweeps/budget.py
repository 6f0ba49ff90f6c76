"""The plan of a sweep and its cost before training, and a time budget (`budget: {hours: H}`).

The plan: per stage, its grid points, runs per point (folds x repeats), the epochs of each rung (one rung of
`max_epochs` when exhaustive) and how many runs reach each rung, hence the epochs and trials it will train.
Its cost is epochs x seconds per epoch + trials x the fixed cost of a trial (start, data, the extra
evaluation pass), from `budget.epoch_seconds` or measured on this sweep's finished trials; with several
workers the budget counts device time (the sum of the trials' times), the ETA divides it among the workers.

With a budget, the sweep:
- chooses `min_epochs` (and, if that is not enough, a larger `eta`) of each successive-halving stage whose
  `min_epochs` is not set: the most epochs per rung that fit;
- refuses, before training, a plan that cannot fit even at its smallest (one `error:` line with the numbers,
  exit code 2);
- while running, does not start a run whose expected cost no longer fits in what is left (measured time of
  finished and running trials): that run is finished untrained as PRUNED, `budget_limited`, and the stage
  ends with the best point so far, ranked on the folds it finished; the leaderboard, report and winner.json
  say "budget-limited" (exit code 0: a winner was chosen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import TrialState

from errors import ConfigError
from sweeps.config import Schedule, SweepConfig
from sweeps.log import log

BUDGET_LIMITED = "budget_limited"  # user attr of a run not trained because the budget would not cover it


def rungs(schedule: Schedule, max_epochs: int) -> list[int]:
    """Epochs at the end of each rung: [max_epochs] when exhaustive; min_epochs * eta^r, capped at max_epochs."""
    if schedule.kind != "successive_halving":
        return [max_epochs]
    first = schedule.min_epochs or max(1, max_epochs // schedule.eta ** 2)
    out, e = [], min(first, max_epochs)
    while e < max_epochs:
        out.append(e)
        e *= schedule.eta
    return [*out, max_epochs]


def survivors(points: int, eta: int, rung: int) -> int:
    """Grid points that train rung `rung`: the best ceil(n / eta^rung), at least 1."""
    return max(1, math.ceil(points / eta ** rung))


@dataclass
class StagePlan:
    """What one stage will train.

    Attributes:
        name: the stage.
        points: grid points (candidates; optimizer x loss pairs).
        runs_per_point: folds x repeats.
        rungs: epochs at the end of each rung.
        eta: promotion factor (successive halving).
        continues: a promoted run continues from its checkpoint (else it retrains from epoch 0).
    """

    name: str
    points: int
    runs_per_point: int
    rungs: list[int]
    eta: int = 3
    continues: bool = True

    def runs_at(self, rung: int) -> int:
        return survivors(self.points, self.eta, rung) * self.runs_per_point if len(self.rungs) > 1 else self.points * self.runs_per_point

    @property
    def trials(self) -> int:
        return sum(self.runs_at(r) for r in range(len(self.rungs)))

    @property
    def epochs(self) -> int:
        total, before = 0, 0
        for r, end in enumerate(self.rungs):
            total += self.runs_at(r) * (end - before if self.continues else end)
            before = end
        return total

    @property
    def exhaustive_epochs(self) -> int:
        return self.points * self.runs_per_point * self.rungs[-1]

    def line(self) -> str:
        per_rung = ", ".join(f"{self.runs_at(r)} runs to epoch {e}" for r, e in enumerate(self.rungs))
        kind = f"successive halving (eta {self.eta}): {per_rung}" if len(self.rungs) > 1 else f"exhaustive, {self.rungs[0]} epochs each"
        share = f" ({100 * self.epochs / self.exhaustive_epochs:.0f}% of exhaustive)" if len(self.rungs) > 1 else ""
        return (f"{self.name}: {self.points} grid points x {self.runs_per_point} runs; {kind}; "
                f"{self.trials} trials, {self.epochs} epochs{share}")


def max_epochs_of(configs: Any) -> int:
    """The most epochs any candidate trains (`trainer.max_epochs`; Lightning's default 1000 is never a sweep's)."""
    values = [(configs.candidate(name).get("trainer") or {}).get("max_epochs") for name in configs.candidates]
    return int(max([v for v in values if v] or [(configs.shared.get("trainer") or {}).get("max_epochs") or 1]))


def plan(sweep: SweepConfig, configs: Any, continues: bool) -> list[StagePlan]:
    """Both stages' plans from the sweep config (stage 2 on any candidate: the most epochs of them)."""
    runs = max(1, sweep.cv.k) * sweep.repeats
    epochs = max_epochs_of(configs)
    s1, s2 = sweep.stage1.schedule, sweep.stage2.schedule
    pairs = len(sweep.stage2.optimizers) * len(sweep.stage2.losses)
    return [StagePlan("stage1", len(configs.candidates), runs, rungs(s1, epochs), s1.eta, continues),
            StagePlan("stage2", pairs, runs, rungs(s2, epochs), s2.eta, continues)]


@dataclass
class Cost:
    """Seconds of one epoch of one run and the fixed seconds of one trial, and where they come from."""

    epoch_seconds: float
    trial_seconds: float
    source: str

    def of(self, plans: list[StagePlan]) -> float:
        return sum(p.epochs * self.epoch_seconds + p.trials * self.trial_seconds for p in plans)


def _sweep_trials(storage: optuna.storages.BaseStorage, sweep_name: str) -> list[optuna.trial.FrozenTrial]:
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    out = []
    for stage in ("stage1", "stage2"):
        if f"{sweep_name}/{stage}" in names:
            out += optuna.load_study(study_name=f"{sweep_name}/{stage}", storage=storage).get_trials(deepcopy=False)
    return out


def measured(trials: list[optuna.trial.FrozenTrial]) -> tuple[float, float, int] | None:
    """Mean seconds per epoch and fixed seconds per trial over the trials that trained (not reused), and
    how many there were; None before any."""
    per_epoch, fixed = [], []
    for t in trials:
        ua = t.user_attrs
        if t.state != TrialState.COMPLETE or not ua.get("seconds") or not ua.get("epochs_run") or ua.get("reused_from"):
            continue
        trained = ua.get("trained_epochs") or ua["epochs_run"]
        train = ua.get("train_seconds") or ua["seconds"]
        per_epoch.append(train / trained)
        fixed.append(max(0.0, ua["seconds"] - train))
    if not per_epoch:
        return None
    return sum(per_epoch) / len(per_epoch), sum(fixed) / len(fixed), len(per_epoch)


def cost_model(sweep: SweepConfig, trials: list[optuna.trial.FrozenTrial]) -> Cost | None:
    """`budget.epoch_seconds` if given (with the measured fixed cost, if any), else the measured cost."""
    seen = measured(trials)
    if sweep.budget.epoch_seconds:
        return Cost(sweep.budget.epoch_seconds, seen[1] if seen else 0.0, "budget.epoch_seconds")
    if seen:
        return Cost(seen[0], seen[1], f"measured on {seen[2]} trained trial{'s' * (seen[2] != 1)}")
    return None


def hours(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 3600:.2f} h)"


def _with_schedules(sweep: SweepConfig, min_epochs: int, eta: int) -> SweepConfig:
    """The sweep with every successive-halving stage whose min_epochs is unset given `min_epochs` and `eta`."""
    stages = {}
    for name in ("stage1", "stage2"):
        stage = getattr(sweep, name)
        if stage.schedule.kind == "successive_halving" and stage.schedule.min_epochs is None:
            stages[name] = replace(stage, schedule=replace(stage.schedule, min_epochs=min_epochs, eta=eta))
    return replace(sweep, **stages)


def fit_budget(sweep: SweepConfig, configs: Any, cost: Cost, continues: bool) -> SweepConfig:
    """The sweep with the most epochs per first rung (smallest eta) that fits the budget.

    Raises:
        ConfigError: even the smallest plan does not fit (one line with the numbers).
    """
    budget_s = sweep.budget.hours * 3600
    free = any(getattr(sweep, s).schedule.kind == "successive_halving" and getattr(sweep, s).schedule.min_epochs is None
               for s in ("stage1", "stage2"))
    top = max_epochs_of(configs)
    etas = [sweep.stage1.schedule.eta, *range(sweep.stage1.schedule.eta + 1, len(configs.candidates) + 2)] if free else [0]
    smallest = sweep
    for eta in etas:
        for first in range(top, 0, -1) if free else [0]:
            candidate = _with_schedules(sweep, first, eta) if free else sweep
            smallest = candidate
            if cost.of(plan(candidate, configs, continues)) <= budget_s:
                return candidate
    plans = plan(smallest, configs, continues)
    need = cost.of(plans)
    detail = "; ".join(p.line() for p in plans)
    raise ConfigError(
        f"budget.hours {sweep.budget.hours:g} = {hours(budget_s)} cannot fit this sweep even at its smallest plan "
        f"({detail}): {sum(p.epochs for p in plans)} epochs x {cost.epoch_seconds:.1f} s + {sum(p.trials for p in plans)} "
        f"trials x {cost.trial_seconds:.1f} s = {hours(need)} ({cost.source}). Raise budget.hours to at least "
        f"{math.ceil(need / 36) / 100:.2f}, or use successive_halving schedules, fewer candidates, folds or epochs."
    )


def announce(sweep: SweepConfig, configs: Any, storage: optuna.storages.BaseStorage, continues: bool) -> SweepConfig:
    """Print the plan (and its cost when known); with a budget, fit the plan to it (see `fit_budget`).

    Returns:
        The sweep, with the chosen `min_epochs`/`eta` where the budget chose them.
    """
    trials = _sweep_trials(storage, sweep.name)
    cost = cost_model(sweep, trials)
    if sweep.budget.hours is not None:
        if cost is None:
            log.info(f"[plan] budget {hours(sweep.budget.hours * 3600)}: no epoch time is known yet (set "
                     "budget.epoch_seconds to plan with one); the budget is enforced as the trials run")
        else:
            sweep = fit_budget(sweep, configs, cost, continues)
    plans = plan(sweep, configs, continues)
    for p in plans:
        log.info(f"[plan] {p.line()}")
    if cost is not None:
        need = cost.of(plans)
        log.info(f"[plan] expected cost {hours(need)} of device time ({cost.epoch_seconds:.1f} s per epoch, "
                 f"{cost.trial_seconds:.1f} s per trial; {cost.source}); ETA {hours(need / sweep.workers)} with "
                 f"{sweep.workers} worker{'s' * (sweep.workers != 1)}"
                 + (f"; budget {hours(sweep.budget.hours * 3600)}" if sweep.budget.hours else ""))
    return sweep


def spent_seconds(trials: list[optuna.trial.FrozenTrial], now: datetime | None = None) -> float:
    """Device time spent: finished trials' recorded seconds plus the running trials' time so far."""
    now = now or datetime.now()
    total = 0.0
    for t in trials:
        if t.state == TrialState.RUNNING and t.datetime_start is not None:
            total += (now - t.datetime_start).total_seconds()
        else:
            total += float(t.user_attrs.get("seconds") or 0.0)
    return total


def over_budget(sweep: SweepConfig, storage: optuna.storages.BaseStorage, epochs: int) -> str | None:
    """Why a run of `epochs` epochs may not start (the budget cannot cover it), or None."""
    if sweep.budget.hours is None:
        return None
    trials = _sweep_trials(storage, sweep.name)
    cost = cost_model(sweep, trials)
    if cost is None:  # nothing measured yet: the first run trains and measures
        return None
    budget_s, spent = sweep.budget.hours * 3600, spent_seconds(trials)
    expected = epochs * cost.epoch_seconds + cost.trial_seconds
    if spent + expected <= budget_s:
        return None
    return (f"budget-limited: {spent:.0f} s of the {budget_s:.0f} s budget spent, this run needs ~{expected:.0f} s "
            f"({epochs} epochs)")


def stage_limited(study: optuna.Study) -> bool:
    """Some run of this stage was not trained for lack of budget."""
    return any(t.user_attrs.get(BUDGET_LIMITED) for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))


def limit(ss: Any, number: int, reason: str) -> None:
    """Finish a claimed run untrained for lack of budget (PRUNED, `budget_limited`)."""
    ss.set_attr(number, BUDGET_LIMITED, reason)
    ss.set_attr(number, "seconds", 0.0)
    ss.study.tell(number, state=TrialState.PRUNED)


def first_epoch_line(stage: str, point: str, seconds: float, epochs: int, point_runs: int, remaining_runs: int,
                     workers: int) -> str:
    """The estimate printed after a grid point's first epoch: its cost per run and the stage's ETA (the first
    epoch's time includes the run's start, so this errs high)."""
    per_run = seconds * epochs
    return (f"[plan] {stage} {point}: first epoch after {seconds:.0f} s -> ~{per_run:.0f} s per run of {epochs} epochs, "
            f"~{hours(per_run * point_runs)} for its {point_runs} run{'s' * (point_runs != 1)}; stage ETA "
            f"~{hours(per_run * remaining_runs / max(1, workers))} for {remaining_runs} runs left")
