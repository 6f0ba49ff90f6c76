"""Is the winner distinguishable? Paired comparisons of a stage's winner with every other candidate.

A validation split of 40-120 images makes one run per candidate mostly noise, so the leaderboard says,
for each candidate, how much worse (or better) than the winner it is on the stage's headline metric, with a
95% interval, and whether that interval includes 0 ("indistinguishable"):

- one run per grid point: a **paired bootstrap** on the same validation images. Each resample redraws
  patients (all their images together; an image without a patient id is a patient of its own) within
  each class, and both models are scored on that same resample, so what the two get right or wrong
  together cancels out of the difference;
- several repeats (seeds): the **corrected resampled t-test** of Nadeau & Bengio (2003, "Inference for the
  generalization error") on the per-repeat differences: the variance of the mean difference is
  (1/J + n_val/n_train) s^2 instead of s^2/J, since repeats that share data are not independent;
- k-fold cross-validation: both. The paired bootstrap runs on the out-of-fold predictions (every non-test
  image, predicted by the fold model that never trained on it), and the corrected t-test on the per-fold
  differences (n_val/n_train = 1/(k-1)); a candidate is indistinguishable when either interval includes 0.

The functions here are pure (arrays in, numbers out); `compare_stage` reads the trials' files.
Metrics are computed here on bootstrap weight matrices rather than with torchmetrics: one matrix
product scores all resamples at once, which makes thousands of resamples per candidate pair cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from evaluation.resampling import Resampler
from runs import files
from runs.files import RunFiles
from sweeps.grid import GRID_KEYS

# Headline metrics that can be computed from per-image predictions, and whether higher is better.
PAIRED_METRICS = {"acc": True, "balanced_acc": True, "sensitivity": True, "specificity": True, "nll": False}


@dataclass(frozen=True)
class Difference:
    """winner - candidate on one metric, with its interval and how it was obtained."""

    diff: float
    low: float
    high: float
    method: str  # "paired bootstrap" or "corrected t-test"

    @property
    def indistinguishable(self) -> bool:
        """The interval includes 0: the data cannot tell the two apart."""
        return bool(self.low <= 0.0 <= self.high) or math.isnan(self.low)

    def text(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_weights(targets: np.ndarray, groups: np.ndarray | None, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(R, N) how often each image is drawn in each resample: patients redrawn within each class stratum.

    Args:
        targets: (N,) integer labels.
        groups: (N,) patient ids (None entries are patients of their own) or None for images.
        n_resamples: R.
        seed: RNG seed.
    """
    sampler = Resampler(targets, groups)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, len(targets)))
    for stratum in sampler.strata:
        counts = rng.multinomial(len(stratum), np.full(len(stratum), 1 / len(stratum)), size=n_resamples)  # (R, G_s)
        for j, g in enumerate(stratum):
            weights[:, sampler.members[g]] = counts[:, j : j + 1]
    return weights


def weighted_metric(probs: np.ndarray, targets: np.ndarray, weights: np.ndarray, metric: str, positive_index: int = 1) -> np.ndarray:
    """A metric of (N, K) probabilities under each row of (R, N) image weights -> (R,).

    acc; balanced_acc (mean per-class recall); sensitivity and specificity (of `positive_index` for two
    classes, macro one-vs-rest for more); nll (mean -log p of the true class).
    """
    k = probs.shape[1]
    pred = probs.argmax(1)
    if metric == "acc":
        return weights @ (pred == targets) / weights.sum(1)
    if metric == "nll":
        return weights @ -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-7, None)) / weights.sum(1)

    def recall(c: int) -> np.ndarray:
        return weights @ ((targets == c) & (pred == c)) / np.maximum(weights @ (targets == c), 1e-12)

    def specificity(c: int) -> np.ndarray:
        return weights @ ((targets != c) & (pred != c)) / np.maximum(weights @ (targets != c), 1e-12)

    if metric == "balanced_acc" or (metric == "sensitivity" and k > 2):
        return np.mean([recall(c) for c in range(k)], axis=0)
    if metric == "sensitivity":
        return recall(positive_index)
    if metric == "specificity":
        return specificity(positive_index) if k == 2 else np.mean([specificity(c) for c in range(k)], axis=0)
    raise KeyError(f"no per-image form for metric '{metric}'; known: {sorted(PAIRED_METRICS)}")


def paired_bootstrap(
    probs_a: np.ndarray, probs_b: np.ndarray, targets: np.ndarray, groups: np.ndarray | None = None,
    metric: str = "acc", n_resamples: int = 2000, level: float = 0.95, seed: int = 0, positive_index: int = 1,
    weights: np.ndarray | None = None,
) -> Difference:
    """metric(a) - metric(b) on the same images, with a percentile interval from paired resamples.

    Args:
        probs_a, probs_b: (N, K) probabilities of the two models for the same N images, same order.
        targets: (N,) labels.
        groups: (N,) patient ids or None.
        metric: one of PAIRED_METRICS.
        n_resamples, level, seed: the bootstrap.
        positive_index: positive class of binary metrics.
        weights: precomputed `bootstrap_weights` (shared by all pairs of a stage).
    """
    ones = np.ones((1, len(targets)))
    diff = float((weighted_metric(probs_a, targets, ones, metric, positive_index)
                  - weighted_metric(probs_b, targets, ones, metric, positive_index))[0])
    w = bootstrap_weights(targets, groups, n_resamples, seed) if weights is None else weights
    d = weighted_metric(probs_a, targets, w, metric, positive_index) - weighted_metric(probs_b, targets, w, metric, positive_index)
    lo, hi = np.percentile(d, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Difference(diff, float(lo), float(hi), "paired bootstrap")


def corrected_t_test(a: list[float], b: list[float], test_train_ratio: float, level: float = 0.95) -> Difference:
    """Nadeau & Bengio's corrected resampled t-test on paired per-repeat values of two models.

    With d_j = a_j - b_j over J repeats, the mean difference has variance (1/J + n_test/n_train) s^2
    (s^2: sample variance of d), and (mean d) / sqrt(that) follows a t distribution with J - 1 degrees of
    freedom. Returns the mean difference and its interval (NaN for fewer than 2 pairs).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        mean = float(d.mean()) if len(d) else math.nan
        return Difference(mean, math.nan, math.nan, "corrected t-test")
    from scipy import stats

    se = math.sqrt((1 / len(d) + test_train_ratio) * d.var(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * se
    return Difference(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, "corrected t-test")


def headline_metric(rule: str, metric: str) -> tuple[str, str]:
    """The compared metric (without `val/`) and a note when the selection's own cannot be compared per image."""
    name = metric.removeprefix("val/")
    if rule == "metric" and name in PAIRED_METRICS:
        return name, ""
    if rule == "metric":
        return "acc", f"`{metric}` has no per-image form, so the comparisons use validation accuracy."
    return "acc", ""


def mark(board: pl.DataFrame, diffs: dict[int, Difference], folds: dict[int, Difference] | None = None) -> pl.DataFrame:
    """Add `vs_winner` (difference [interval]), its numbers and `indistinguishable` (row index -> Difference;
    the winner is row 0 and gets no comparison). Under cross-validation `folds` holds the corrected t-tests
    across folds (`vs_winner_folds`); a candidate is then indistinguishable when either interval includes 0."""
    get = [diffs.get(i) for i in range(board.height)]
    per_fold = [(folds or {}).get(i) for i in range(board.height)]
    same = [None if d is None and f is None else any(x.indistinguishable for x in (d, f) if x is not None)
            for d, f in zip(get, per_fold, strict=True)]
    out = board.with_columns(
        pl.Series("vs_winner", [d.text() if d else None for d in get], dtype=pl.String),
        pl.Series("vs_winner_diff", [d.diff if d else None for d in get], dtype=pl.Float64),
        pl.Series("vs_winner_low", [d.low if d else None for d in get], dtype=pl.Float64),
        pl.Series("vs_winner_high", [d.high if d else None for d in get], dtype=pl.Float64),
    )
    if folds is not None:
        out = out.with_columns(pl.Series("vs_winner_folds", [f.text() if f else None for f in per_fold], dtype=pl.String))
    return out.with_columns(pl.Series("indistinguishable", same, dtype=pl.Boolean))


def verdict(board: pl.DataFrame, label) -> tuple[str, dict | None]:
    """A plain sentence on whether the data separate the winner from the rest, and the parsimonious choice:
    the candidate with the fewest parameters among the winner and those indistinguishable from it (None
    when that is the winner itself or nothing was compared)."""
    if "indistinguishable" not in board.columns or board.height < 2 or board["indistinguishable"].drop_nulls().is_empty():
        return "", None
    rows = list(board.iter_rows(named=True))
    ties = [r for r in rows[1:] if r["indistinguishable"]]
    # Under the rank score the winner can be beaten on the compared metric alone: say so, never "better".
    better = [r for r in rows[1:] if r["indistinguishable"] is False and r["vs_winner_high"] < 0]
    beaten = "" if not better else (
        f" {', '.join(label(r) for r in better)} scored better than the winner on this metric beyond the noise "
        "(the interval is below 0); the winner won on the selection rule, which weighs other terms too.")
    if not ties:
        if better:
            return beaten.strip(), None
        return (f"The winner {label(rows[0])} is better than every other candidate by more than the noise "
                "(every 95% interval of the difference excludes 0)."), None
    names = ", ".join(label(r) for r in ties)
    text = (f"The data cannot separate the winner {label(rows[0])} from {names}: the 95% interval of each "
            "difference includes 0, so their order on this validation data may be chance." + beaten)
    simplest = min([rows[0], *ties], key=lambda r: (r["params"], r["rank"]))
    if simplest is rows[0]:
        return text + " The winner is also the simplest of them.", None
    return (text + f" The simplest of them, {label(simplest)} ({simplest['params']:,} parameters against "
            f"{rows[0]['params']:,}), is the parsimonious choice."), simplest


def _split_ratio(run_dir: Path) -> float | None:
    """n_val / n_train of a run, from its train_eval.json or else its split_counts.csv (None: unknown)."""
    info = RunFiles(run_dir).read_json(files.TRAIN_EVAL)
    if info and info.get("n_train"):
        return info["n_val"] / info["n_train"]
    path = Path(run_dir) / files.SPLIT_COUNTS
    if not path.is_file():
        return None
    counts = pl.read_csv(path).filter(pl.col("class") == "total").row(0, named=True)
    return counts["val"] / counts["train"]


def _predictions(run_dir: Path) -> pl.DataFrame | None:
    path = run_dir / files.VAL_PREDICTIONS
    return pl.read_parquet(path) if path.is_file() else None


def _groups(preds: pl.DataFrame) -> list | None:
    return preds["patient_id"].to_list() if "patient_id" in preds.columns else None


def _by_point(trials: pl.DataFrame, board: pl.DataFrame, keys: list[str]) -> list[pl.DataFrame]:
    """The trials of each leaderboard row, in board order, sorted by repeat."""
    return [trials.filter(pl.all_horizontal([pl.col(k) == r[k] for k in keys])).sort("repeat")
            for r in board.iter_rows(named=True)]


def _uses_t_test(trials: pl.DataFrame, name: str) -> bool:
    return trials["repeat"].n_unique() > 1 and f"val/{name}" in trials.columns


def method_text(trials: pl.DataFrame, board: pl.DataFrame, keys: list[str], rule: str, metric: str, root: Path,
                n_resamples: int = 2000, folds: int = 0) -> str:
    """One sentence naming how `compare_stage` compares these candidates (for the report; `folds` >= 2:
    cross-validation, `trials` as `crossval.as_samples` gives them)."""
    name, note = headline_metric(rule, metric)
    if board.height < 2:
        return ""
    winner = _by_point(trials, board.head(1), keys)[0]
    run_dir = Path(root) / winner["run_dir"][0]
    if folds >= 2:
        text = (f"Each candidate is compared with the winner on validation {name} in two ways: a paired bootstrap "
                f"({n_resamples} resamples, stratified by class, patients drawn whole) of the out-of-fold predictions, "
                "in which every non-test image is predicted by the fold model that never trained on it (`vs_winner`), "
                f"and the corrected resampled t-test (Nadeau & Bengio 2003) across the {folds} folds"
                + (" of every repeat" if trials["repeat"].n_unique() > folds else "")
                + f" (n_val/n_train = 1/{folds - 1}; `vs_winner_folds`). A candidate is marked indistinguishable "
                "when either 95% interval includes 0")
    elif _uses_t_test(trials, name):
        ratio = _split_ratio(run_dir)
        if ratio is None:
            return "No comparison over repeats: the winner's run directory does not record its split sizes."
        text = (f"Each candidate is compared with the winner by the corrected resampled t-test (Nadeau & Bengio "
                f"2003) on validation {name} over repeats paired by seed (n_val/n_train = {ratio:.3f})")
    else:
        base = _predictions(run_dir)
        if base is None:
            return "No paired comparison: the winner's val_predictions.parquet is missing."
        ids = [g for g in (_groups(base) or []) if g is not None]
        text = (f"Each candidate is compared with the winner by a paired bootstrap ({n_resamples} resamples of "
                f"the same {base.height} validation images, stratified by class"
                + (f", patients drawn whole ({len(set(ids))} patient ids)" if ids else "")
                + f") of the difference in validation {name}")
    return text + "; `vs_winner` is winner minus candidate (positive: the winner is better) with its 95% interval." + (
        f" {note}" if note else "")


def _t_tests(trials: pl.DataFrame, points: list[pl.DataFrame], name: str, root: Path) -> dict[int, Difference] | None:
    """Corrected t-test of the winner (points[0]) against every other point, paired by `repeat`."""
    ratio = _split_ratio(Path(root) / points[0]["run_dir"][0])
    if ratio is None:
        return None
    col, diffs = f"val/{name}", {}
    for i, other in enumerate(points[1:], start=1):
        pair = points[0].select("repeat", pl.col(col).alias("a")).join(other.select("repeat", pl.col(col).alias("b")), on="repeat")
        diffs[i] = corrected_t_test(pair["a"].to_list(), pair["b"].to_list(), ratio)
    return diffs


def _bootstraps(predictions: dict[int, pl.DataFrame], name: str, n_resamples: int, seed: int) -> dict[int, Difference]:
    """Paired bootstrap of the winner's predictions (key 0) against every other point's, on the same images."""
    base = predictions.get(0)
    if base is None:
        return {}
    prob_cols = [c for c in base.columns if c.startswith("p_")]
    weights = bootstrap_weights(base["target"].to_numpy(), _groups(base), n_resamples, seed)
    diffs = {}
    for i, theirs in predictions.items():
        if i == 0:
            continue
        joined = base.select("path").join(theirs, on="path", how="left", maintain_order="left")
        if joined[prob_cols[0]].null_count():
            continue  # not the same validation images: no paired comparison
        diffs[i] = paired_bootstrap(base.select(prob_cols).to_numpy(), joined.select(prob_cols).to_numpy(),
                                    base["target"].to_numpy(), metric=name, weights=weights)
    return diffs


def compare_stage(
    trials: pl.DataFrame, board: pl.DataFrame, keys: list[str], rule: str, metric: str, root: Path = Path("."),
    n_resamples: int = 2000, seed: int = 0, oof: dict[int, pl.DataFrame] | None = None,
) -> pl.DataFrame:
    """The leaderboard with every candidate compared to the winner (row 0).

    Several repeats: corrected t-test on the per-repeat `val/<metric>` (paired by repeat). One run per
    grid point: paired bootstrap on the two trials' val_predictions.parquet (joined on the image path).
    Cross-validation (`oof` given): paired bootstrap on the out-of-fold predictions and the corrected
    t-test across fold runs (`trials` then has one `repeat` value per fold run, `crossval.as_samples`).
    Candidates that cannot be compared (missing files, other images) get no mark.

    Args:
        trials: the stage's trials (keys, repeat, run_dir, val/<metric>).
        board: the leaderboard, winner first.
        keys: grid-point columns.
        rule, metric: the selection rule and metric (see `headline_metric`).
        root: folder the trials' run_dir values are relative to (the sweep folder).
        n_resamples, seed: the bootstrap.
        oof: per leaderboard row, its out-of-fold predictions (`crossval.out_of_fold`).
    """
    name, _ = headline_metric(rule, metric)
    if board.height < 2:
        return board
    points = _by_point(trials, board, keys)

    def oriented(diffs: dict[int, Difference] | None) -> dict[int, Difference] | None:
        if diffs is None or PAIRED_METRICS[name]:
            return diffs
        # lower is better: flip so that positive always means the winner is better
        return {i: Difference(-d.diff, -d.high, -d.low, d.method) for i, d in diffs.items()}

    t_tests = oriented(_t_tests(trials, points, name, root)) if _uses_t_test(trials, name) else None
    if oof is not None:
        return mark(board, oriented(_bootstraps(oof, name, n_resamples, seed)), folds=t_tests or {})
    if t_tests is not None or _uses_t_test(trials, name):
        return board if t_tests is None else mark(board, t_tests)
    predictions = {i: p for i, point in enumerate(points) if (p := _predictions(Path(root) / point["run_dir"][0])) is not None}
    if 0 not in predictions:
        return board
    return mark(board, oriented(_bootstraps(predictions, name, n_resamples, seed)))


def stage_notes(selection, trials: pl.DataFrame, board: pl.DataFrame, root: Path, folds: int = 0) -> tuple[list[str], dict | None]:
    """The report's sentences under a stage's leaderboard: which loss and overfit terms the rank score used,
    which grid points are incomplete, how candidates were compared, and whether the data separate the
    winner from them; plus the parsimonious choice (None when it is the winner or nothing was compared).

    Args:
        selection: the sweep's `Selection`.
        trials: the stage's trials.
        board: its leaderboard (after `compare_stage`).
        root: the sweep folder.
        folds: the sweep's cross-validation folds (0: none); `trials` then has one `repeat` per fold run.
    """
    from sweeps.ranking import resolve_terms

    keys = [k for k in GRID_KEYS if k in board.columns]

    def label(row: dict) -> str:
        return "**" + " + ".join(str(row[k]) for k in keys) + "**"

    notes = resolve_terms(trials, selection)[1] if selection.rule == "rank_score" else []
    if "complete" in board.columns and not board["complete"].all():
        short = ", ".join(f"{label(r)} ({r['repeats']} repeats)" for r in board.iter_rows(named=True) if not r["complete"])
        notes.append(f"Incomplete (failed, pruned or missing repeats): {short}; "
                     + ("they may still win (selection.allow_incomplete)." if selection.allow_incomplete
                        else "they cannot win (selection.allow_incomplete: false)."))
    notes.append(method_text(trials, board, keys, selection.rule, selection.metric, root, folds=folds))
    text, simplest = verdict(board, label)
    if text:
        notes.append(text)
    return [n for n in notes if n], simplest
