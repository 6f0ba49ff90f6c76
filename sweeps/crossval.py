"""k-fold cross-validated selection (`cv: {folds: k}` in a sweep): folds as grid points, out-of-fold
predictions, and the final model (refit or ensemble).

The folds themselves are the data layer's (`data.split.folds` / `data.split.fold`, a column of the split
file): the test split is held out once and the rest is cut into k stratified, patient-grouped folds. Here
each fold is one more key of a grid point, like `repeat`, so the coordinator claims, retries and resumes
fold runs exactly like repeats (workers, PostgreSQL, `--retry_failed` unchanged). Pruning acts per fold:
each fold run reports its own epochs to the stage's pruner and is compared with the other runs at the same
epoch; a grid point with a pruned fold is incomplete and cannot win (unless `selection.allow_incomplete`).

For ranking, each fold of a grid point is one sample (`as_samples`; with repeats, the repeats of a fold
are averaged first: every repeat reuses the same folds, so its runs are not new resamples of the data):
the leaderboard shows fold means with their 95% t-interval over the k folds, the rank score ranks the
means, and `first_in_repeats` counts the folds on which a point came first. The paired comparisons use
the out-of-fold probabilities (every non-test image, predicted by the fold model that did not train on
it) and the corrected resampled t-test across the k folds, with n_val/n_train = 1/(k-1)
(`sweeps.compare`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import polars as pl

from errors import SweepError
from runs import files
from runs.files import RunFiles
from sweeps import grid, jobs, trials
from sweeps.config import SweepConfig, merge

OOF_DIR = "oof"  # <sweep>/oof/<stage>/<grid point>.parquet
FINAL_DIR = "final"  # <sweep>/final/refit (the refit run) or <sweep>/final/ensemble (its test results)


def as_samples(frame: pl.DataFrame, keys: list[str], folds: int, repeats: int = 1) -> pl.DataFrame:
    """One row per (grid point, fold) with `repeat` set to the fold, so that leaderboards and t-tests treat
    each fold as one paired sample (the same fold pairs up across grid points). Repeats of a fold are
    averaged; a fold missing some of its `repeats` (failed, pruned) is left out, so its point is incomplete.
    Without cross-validation, `frame` as it is."""
    if folds < 2 or frame.is_empty() or "fold" not in frame.columns:
        return frame
    metrics = [c for c in frame.columns if "/" in c]
    grouped = frame.sort("repeat").group_by([*keys, "fold"], maintain_order=True).agg(
        pl.len().alias("__runs"), pl.col("params").first(), pl.col("run_dir").first(), pl.col("trial").first(),
        *[pl.col(m).cast(pl.Float64).mean() for m in metrics],
    )
    return grouped.filter(pl.col("__runs") >= repeats).drop("__runs").with_columns(repeat=pl.col("fold")).sort([*keys, "fold"])


def out_of_fold(trials_frame: pl.DataFrame, board: pl.DataFrame, keys: list[str], stage: str, root: Path
                ) -> dict[int, pl.DataFrame]:
    """Write each grid point's out-of-fold validation probabilities to `<root>/oof/<stage>/<point>.parquet`
    (path, patient_id, target, fold, repeat, p_<class>; one row per non-test image and repeat) and return,
    per leaderboard row, the probabilities averaged over repeats (one row per image) for the paired
    bootstrap. A point whose folds did not all write predictions is left out."""
    out_dir = Path(root) / OOF_DIR / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[int, pl.DataFrame] = {}
    for i, row in enumerate(board.iter_rows(named=True)):
        runs = trials_frame.filter(pl.all_horizontal([pl.col(k) == row[k] for k in keys]))
        parts = []
        for run in runs.iter_rows(named=True):
            path = Path(root) / run["run_dir"] / files.VAL_PREDICTIONS
            if not path.is_file():
                parts = []
                break
            parts.append(pl.read_parquet(path).with_columns(fold=pl.lit(run["fold"], pl.Int32),
                                                            repeat=pl.lit(run["repeat"], pl.Int32)))
        if not parts:
            continue
        oof = pl.concat(parts, how="diagonal_relaxed")
        oof.write_parquet(out_dir / f"{grid.slug(grid.point_label(row, keys), 80)}.parquet")
        probs = [c for c in oof.columns if c.startswith("p_")]
        result[i] = (oof.group_by("path", maintain_order=True)
                     .agg(pl.col("patient_id").first(), pl.col("target").first(), *[pl.col(c).mean() for c in probs])
                     .sort("path"))
    return result


def refit_epochs(winner_trials: pl.DataFrame) -> int:
    """Epochs of the refit: the median over the winner's fold runs of the epoch their best checkpoint came
    from (1-based), rounded up."""
    epochs = [int(e) + 1 for e in winner_trials["epoch"].to_list() if e is not None] if "epoch" in winner_trials.columns else []
    if not epochs:
        raise SweepError("cannot refit the winner: its fold runs recorded no best epoch")
    return int(-(-statistics.median(epochs) // 1))


REFIT_OF = "refit_of.json"  # what a refit was trained for; a rerun reuses it only for the same winner


def refit(sweep: SweepConfig, cfg: dict[str, Any], winner_trials: pl.DataFrame, tags: list[str],
          execute=None) -> Path:
    """Train the winning configuration once on every non-test image for `refit_epochs` epochs (no validation;
    the last epoch is the model) in `<sweep>/final/refit`, with `execute` (default `jobs.execute`). A
    finished refit of the same winner (its config, epochs and seed) is reused; any other is replaced."""
    run_dir = sweep.out_dir / FINAL_DIR / "refit"
    epochs = refit_epochs(winner_trials)
    of = json.loads(json.dumps({"config": cfg, "epochs": epochs, "seed": sweep.seed, "folds": sweep.cv.folds}, default=str))
    if RunFiles(run_dir).best_checkpoint.exists() and RunFiles(run_dir).read_json(REFIT_OF) == of:
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = trials.finalize(cfg, sweep, run_dir, "refit", sweep.seed, [*tags, "refit"], None)
    cfg = merge(cfg, {**grid.fold_overrides(sweep, "all"), "trainer": {"max_epochs": epochs}})
    print(f"[sweep] refit of the winner on all non-test images for {epochs} epoch{'s' * (epochs != 1)} (median best epoch of its "
          f"{winner_trials.height} fold runs) -> {run_dir}", flush=True)
    outcome = (execute or jobs.execute)(cfg, run_dir)
    if outcome.status != "ok":
        raise SweepError(f"the refit of the winner failed: {outcome.reason} (log: {run_dir / 'fit.log'}); "
                         "rerun the sweep to try again")
    RunFiles(run_dir).write_json(REFIT_OF, of)
    return run_dir


def ensemble_test(sweep: SweepConfig, run_dirs: list[Path], evaluate) -> dict[str, Any]:
    """Test the winner's fold models once each and score their averaged test probabilities, with bootstrap
    intervals (stratified by class, patients whole). Writes `<sweep>/final/ensemble/test_metrics.json` and
    `test_predictions.parquet`; returns the test summary (`metrics`, `intervals`, `members`)."""
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise SweepError(f"the ensemble's fold model {run_dir} is not on this machine (trained by a sweep command "
                             "elsewhere): run the sweep where it was trained, or use one shared sweep folder")
        evaluate(run_dir)
    frames = [pl.read_parquet(RunFiles(d) / files.TEST_PREDICTIONS).sort("path") for d in run_dirs]
    probs = [c for c in frames[0].columns if c.startswith("p_")]
    if any(f["path"].to_list() != frames[0]["path"].to_list() for f in frames[1:]):
        raise SweepError("the fold models were tested on different test images; delete their test results and rerun")
    import numpy as np

    mean = np.mean([f.select(probs).to_numpy() for f in frames], axis=0)
    info = RunFiles(run_dirs[0]).read_json(files.MODEL_INFO) or {}
    classes = [c.removeprefix("p_") for c in probs]
    positive = classes.index(info["positive_class"]) if info.get("positive_class") in classes else 1
    targets = frames[0]["target"].to_numpy() if "target" in frames[0].columns else np.array(
        [classes.index(x) for x in frames[0]["label"].to_list()])
    from evaluation.intervals import bootstrap, patient_groups

    groups = patient_groups(frames[0]["patient_id"].to_list()) if "patient_id" in frames[0].columns else None
    overall, _ = bootstrap(mean, targets, positive, groups)
    out = RunFiles(sweep.out_dir / FINAL_DIR / "ensemble")
    Path(out.root).mkdir(parents=True, exist_ok=True)
    frames[0].select([c for c in frames[0].columns if not c.startswith("p_") and c != "predicted"]).with_columns(
        predicted=pl.Series([classes[i] for i in mean.argmax(1)]),
        **{c: pl.Series(mean[:, j]) for j, c in enumerate(probs)},
    ).write_parquet(out / files.TEST_PREDICTIONS)
    summary = {
        "metrics": {k: v.value for k, v in overall.items()},
        "intervals": {k: [v.low, v.high] for k, v in overall.items()},
        "members": [os.path.relpath(d, sweep.out_dir) for d in run_dirs],
        "n_images": int(len(targets)),
        "final": "ensemble",
    }
    out.write_json(files.TEST_METRICS, summary)
    return summary
