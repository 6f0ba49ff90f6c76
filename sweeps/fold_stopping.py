"""Early stopping across folds under cross-validation (`cv.early_stop`).

Folds run breadth-first (`sweeps.grid.runs`: fold 0 of every grid point, then fold 1, ...). When a worker
claims a fold run, the grid point's finished folds are paired with the current best point's (the best mean
of the stage's criterion over its finished folds, among points not stopped); once at least `min_folds`
folds are paired, a one-sided test asks whether the point is worse. If p < `alpha` the run is not trained:
it is finished as PRUNED with the reason ("stopped after 2 folds: worse than resnet10t (p = 0.012, ...)"),
and so is every later fold of that point (the decision is sticky and recorded on the trial, so workers and
reruns after a kill see it). A stopped point is incomplete and is ranked after every other point: it never
wins.

Why not Optuna's `WilcoxonPruner` (3.6): it judges one trial by the intermediate values it reports step by
step (here: fold by fold) against the study's best COMPLETE trial. Here each fold run is its own trial (so
that folds are claimed, retried and resumed exactly once, like repeats), and folds run breadth-first, so no
configuration has completed all its folds until the last round: `WilcoxonPruner` would have no best trial
to compare with until then. The same paired one-sided test is computed here with scipy, on the folds both
points finished. Its exact form also cannot stop early on few folds (its smallest p on n folds is 1/2^n:
0.25 on 2 folds), hence the default, the corrected resampled t-test (Nadeau & Bengio 2003), which accounts
for the overlap of the folds' training sets (n_val/n_train = 1/(k-1)).

The criterion is the selection metric under `rule: metric`, and validation accuracy under the rank score
(which ranks points against each other and has no per-fold value of its own).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from optuna.trial import TrialState

from sweeps import coordinator as coord
from sweeps.config import SweepConfig

STOPPED = "stopped"  # user attr of a fold run that was not trained: why its point stopped


def criterion(sweep: SweepConfig) -> tuple[str, str]:
    """The metric the folds are compared on and its direction."""
    if sweep.selection.rule == "metric":
        return sweep.selection.metric, sweep.selection.direction
    return "val/acc", "maximize"


def point_key(ss: coord.StageStudy, params: dict[str, Any]) -> tuple:
    """A grid point (and its rung under successive halving), without repeat and fold."""
    return (*(params.get(k) for k in ss.stage.keys), params.get("rung"))


def fold_values(ss: coord.StageStudy, metric: str) -> dict[tuple, dict[int, float]]:
    """Per grid point, its finished folds' values of `metric` (the mean over a fold's finished repeats)."""
    runs: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for t in coord.finished(ss.study):
        params = coord.grid_params(t)
        value = (t.user_attrs.get("metrics") or {}).get(metric)
        if params.get("fold") is not None and value is not None and not math.isnan(value):
            runs[point_key(ss, params)][int(params["fold"])].append(float(value))
    return {k: {f: sum(v) / len(v) for f, v in folds.items()} for k, folds in runs.items()}


def stopped_points(ss: coord.StageStudy) -> dict[tuple, str]:
    """The grid points stopped so far, with their reasons."""
    out = {}
    for t in ss.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if t.user_attrs.get(STOPPED):
            out.setdefault(point_key(ss, coord.grid_params(t)), t.user_attrs[STOPPED])
    return out


def p_worse(best: list[float], candidate: list[float], test: str, test_train_ratio: float, higher_is_better: bool) -> float:
    """One-sided p-value that `candidate` is worse than `best` on paired folds (1.0 when it cannot say)."""
    import numpy as np
    from scipy import stats

    d = np.asarray(best, dtype=float) - np.asarray(candidate, dtype=float)
    d = d if higher_is_better else -d  # positive: the best is better on that fold
    if len(d) < 2 or not np.any(d != 0):
        return 1.0
    if test == "wilcoxon":
        return float(stats.wilcoxon(d, alternative="greater", zero_method="zsplit").pvalue)
    var = float(d.var(ddof=1))
    if var == 0:  # the same difference on every fold: the t statistic is unbounded in its sign's direction
        return 0.0 if d.mean() > 0 else 1.0
    t = float(d.mean()) / math.sqrt((1 / len(d) + test_train_ratio) * var)
    return float(stats.t.sf(t, len(d) - 1))


def verdict(sweep: SweepConfig, ss: coord.StageStudy, params: dict[str, Any]) -> str | None:
    """Why this fold run's point should stop (the sentence the leaderboard and report show), or None."""
    stop = sweep.cv.early_stop
    if not stop.enabled or params.get("fold") is None:
        return None
    key = point_key(ss, params)
    stopped = stopped_points(ss)
    if key in stopped:
        return stopped[key]
    metric, direction = criterion(sweep)
    values = fold_values(ss, metric)
    rung = [k for k in values if k not in stopped and k[-1] == key[-1]]
    if key not in values or len(rung) < 2:
        return None
    sign = 1 if direction == "maximize" else -1
    best = max(rung, key=lambda k: sign * sum(values[k].values()) / len(values[k]))
    paired = sorted(set(values[best]) & set(values[key]))
    if best == key or len(paired) < stop.min_folds:
        return None
    a, b = [values[best][f] for f in paired], [values[key][f] for f in paired]
    p = p_worse(a, b, stop.test, 1 / (sweep.cv.k - 1), direction == "maximize")
    if p >= stop.alpha:
        return None
    name = ss.stage.label(dict(zip(ss.stage.keys, best, strict=False)))
    test = "corrected t-test" if stop.test == "corrected_t" else "Wilcoxon signed-rank"
    return (f"stopped after {len(values[key])} folds: worse than {name} (p = {p:.3g}, one-sided {test} on "
            f"{len(paired)} paired folds; {metric} {sum(b) / len(b):.4f} vs {sum(a) / len(a):.4f})")


def stop(ss: coord.StageStudy, number: int, reason: str) -> None:
    """Finish a claimed fold run untrained, as PRUNED with its point's reason."""
    ss.set_attr(number, STOPPED, reason)
    ss.set_attr(number, "seconds", 0.0)
    ss.study.tell(number, state=TrialState.PRUNED)
