"""The two-stage model selection of study 002 as a resumable, parallel Optuna sweep.

Stage 1 trains every candidate architecture with the shared defaults and picks the base architecture;
stage 2 trains that winner with every optimizer x loss pair and picks the pair; the final winner is then
evaluated once on the untouched test split. Each stage is an Optuna study in one storage; the winner rule
is applied afterwards to the metrics stored on the trials (see `sweeps.ranking`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import polars as pl
import yaml
from optuna.trial import FrozenTrial, TrialState

from errors import ConfigError, SweepError
from runs import files
from runs.files import PROGRESS, RunFiles
from sweeps import compare, crossval, isolation, outputs, ranking, trials
from sweeps import coordinator as coord
from sweeps.config import SweepConfig, merge
from sweeps.preflight import check_in_child
from sweeps.progress import StageProgress, follow

GRID_KEYS = {"stage1": ["candidate"], "stage2": ["optimizer", "loss"]}
Execute = Callable[[dict[str, Any], Path], isolation.Outcome]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:60]


def _objective(sweep: SweepConfig, run_cfg: dict[str, Any]) -> tuple[str, str]:
    """The metric told to Optuna (and used for pruning): the selection metric, or the run's monitor."""
    if sweep.selection.rule == "metric":
        return sweep.selection.metric, sweep.selection.direction
    run = run_cfg.get("run", {}) or {}
    return run.get("monitor", "val/loss"), "maximize" if run.get("mode") == "max" else "minimize"


def _runs(sweep: SweepConfig, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run of the grid: each point once per repeat, and once per fold under cross-validation."""
    folds = [{"fold": f} for f in range(sweep.cv.folds)] if sweep.cv.enabled else [{}]
    return [{**p, "repeat": r, **f} for r in range(sweep.repeats) for p in points for f in folds]


def stage1(sweep: SweepConfig, configs: trials.TrialConfigs) -> coord.Stage:
    objective, direction = _objective(sweep, configs.shared)
    grid = _runs(sweep, [{"candidate": name} for name in configs.candidates])
    return coord.Stage("stage1", f"{sweep.name}/stage1", grid, objective, direction)


def stage2(sweep: SweepConfig, configs: trials.TrialConfigs) -> coord.Stage:
    objective, direction = _objective(sweep, configs.shared)
    grid = _runs(sweep, [{"optimizer": o, "loss": loss} for o in sweep.stage2.optimizers for loss in sweep.stage2.losses])
    return coord.Stage("stage2", f"{sweep.name}/stage2", grid, objective, direction)


def trial_config(configs: trials.TrialConfigs, stage: coord.Stage, params: dict[str, Any], base: str | None) -> tuple[dict, list[str]]:
    """The fit config of one grid point and its W&B tags."""
    if stage.name == "stage1":
        name = params["candidate"]
        cfg = configs.candidate(name)
    else:
        name = base
        cfg = configs.stage2(name, params["optimizer"], params["loss"])
    opt = cfg["model"]["optimizer"]
    opt_name = opt.get("class_path", "").rsplit(".", 1)[-1] if isinstance(opt, dict) else str(opt)
    tags = [f"arch:{name}", f"optimizer:{opt_name}", f"loss:{cfg['model'].get('loss', 'ce')}", f"repeat:{params['repeat']}"]
    if params.get("fold") is not None:
        tags.append(f"fold:{params['fold']}")
    return cfg, tags


def _label(stage: coord.Stage, params: dict[str, Any]) -> str:
    return "-".join(str(params[k]) for k in GRID_KEYS[stage.name])


def _run_label(stage: coord.Stage, params: dict[str, Any]) -> str:
    """A run's name within its stage: the grid point, its repeat and (under cross-validation) its fold."""
    fold = f"-f{params['fold']}" if params.get("fold") is not None else ""
    return f"{_label(stage, params)}-r{params['repeat']}{fold}"


def best_so_far(ss: coord.StageStudy) -> str:
    """The best finished trial of the stage by its objective, e.g. 'val/loss=0.4123 (resnet10t)'."""
    try:
        best = ss.study.best_trial
    except ValueError:  # no trial has finished yet
        return ""
    return f"{ss.stage.objective}={best.value:.4f} ({_label(ss.stage, coord.grid_params(best))})"


def points_done(ss: coord.StageStudy) -> int:
    """Grid points that reached an end (finished, failed or interrupted) and are not queued again."""
    return sum(p.state not in ("live", "missing") for p in coord.grid_status(ss))


class TrialRunner:
    """Runs one claimed trial in an isolated process and records its outcome on the Optuna trial.

    Args:
        sweep: the sweep config.
        stage: the stage the trial belongs to.
        base: the stage-1 winner (stage 2).
        configs: the sweep's trial configs.
        progress: the stage's progress display.
        execute: trains a config in a run directory and says how it ended (`isolation.execute`).
    """

    def __init__(self, sweep: SweepConfig, stage: coord.Stage, base: str | None, configs: trials.TrialConfigs,
                 progress: StageProgress, execute: Execute | None = None):
        self.sweep, self.stage, self.base, self.configs = sweep, stage, base, configs
        self.progress, self.execute = progress, execute or isolation.execute

    def _prepare(self, ss: coord.StageStudy, number: int, params: dict[str, Any]) -> tuple[dict, Path]:
        relative = Path("trials") / self.stage.name / f"{number:03d}-{_slug(_run_label(self.stage, params))}"
        run_dir = self.sweep.out_dir / relative
        if run_dir.exists():  # a retried trial number never reuses a directory, but be safe on manual edits
            shutil.rmtree(run_dir)
        cfg, tags = trial_config(self.configs, self.stage, params, self.base)
        if params.get("fold") is not None:
            cfg = merge(cfg, crossval.fold_overrides(self.sweep, params["fold"]))
        pruning = None
        if self.sweep.pruner != "none":
            pruning = {"storage": self.sweep.storage_url, "study_name": self.stage.study_name,
                       "trial_id": ss.trial_id(number), "monitor": self.stage.objective, "pruner": self.sweep.pruner,
                       "fold": params.get("fold"), "direction": self.stage.direction}
        cfg = trials.finalize(cfg, self.sweep, run_dir, self.stage.name, self.sweep.seed + params["repeat"], tags, pruning)
        ss.set_attr(number, "run_dir", relative.as_posix())  # relative to the sweep folder
        ss.set_attr(number, "sweep_dir", str(self.sweep.out_dir.resolve()))  # for workers with other folders
        return cfg, run_dir

    def __call__(self, ss: coord.StageStudy, frozen: FrozenTrial) -> None:
        number, params = frozen.number, coord.grid_params(frozen)
        trial = optuna.trial.Trial(ss.study, ss.trial_id(number))
        for name, values in self.stage.search_space().items():  # records the fixed grid point as its params
            trial.suggest_categorical(name, values)
        cfg, run_dir = self._prepare(ss, number, params)
        label = f"trial {number} {_run_label(self.stage, params)}"
        print(f"[sweep] {self.stage.name} {label} -> {run_dir} (log: fit.log)", flush=True)
        self.progress.trial_started(label)
        started = time.perf_counter()
        with coord.Heartbeat(ss, number, self.sweep.heartbeat_seconds), \
                follow(RunFiles(run_dir) / PROGRESS, self.progress.epoch_done):
            outcome = self.execute(cfg, run_dir)
        seconds = time.perf_counter() - started
        self._record(ss, number, run_dir, cfg, outcome, seconds)
        self.progress.trial_finished(seconds, points_done(ss), best_so_far(ss))

    def _record(self, ss: coord.StageStudy, number: int, run_dir: Path, cfg: dict, outcome: isolation.Outcome,
                seconds: float) -> None:
        name = f"[sweep] {self.stage.name} trial {number}"
        ss.set_attr(number, "seconds", round(seconds, 2))
        timing = RunFiles(run_dir).read_json(files.TIMING)
        if timing:  # train+validation loop time; the rest of `seconds` is the trial's fixed cost
            ss.set_attr(number, "train_seconds", round(timing["train_seconds"], 2))
        if outcome.status == "interrupted":
            coord.fail(ss, number, f"{coord.INTERRUPTED}: {outcome.reason}")
            print(f"{name} INTERRUPTED ({seconds:.0f}s): {outcome.reason}; it is retried when the sweep is rerun", flush=True)
            return
        if outcome.status != "ok":
            coord.fail(ss, number, outcome.reason)
            print(f"{name} FAILED ({seconds:.0f}s): {outcome.reason}", flush=True)
            return
        run = cfg.get("run", {})
        try:
            summary = trials.summarize(run_dir, self.sweep.selection.epoch, run.get("monitor", "val/loss"), run.get("mode", "min"))
        except RuntimeError as e:
            coord.fail(ss, number, str(e))
            return
        for key in ("metrics", "params", "epoch", "epochs_run"):
            ss.set_attr(number, key, summary[key])
        if RunFiles(run_dir).pruned.exists():
            ss.study.tell(number, state=TrialState.PRUNED)
            print(f"{name} pruned after {summary['epochs_run']} epochs", flush=True)
            return
        value = summary["metrics"].get(self.stage.objective)
        if value is None:
            coord.fail(ss, number, f"objective '{self.stage.objective}' was not logged")
            return
        ss.study.tell(number, value)
        print(f"{name} done in {seconds:.0f}s: {self.stage.objective}={value:.4f}", flush=True)


def _worker_main(sweep_dict: dict, stage_name: str, base: str | None, env: dict[str, str]) -> None:
    os.environ.update(env)
    from sweeps.cli import sweep_from_dict

    isolation.start_forkserver()
    sweep = sweep_from_dict(sweep_dict)
    configs = trials.TrialConfigs(sweep)
    run_stage_worker(sweep, (stage1 if stage_name == "stage1" else stage2)(sweep, configs), base, configs)


def _open(sweep: SweepConfig, stage: coord.Stage) -> coord.StageStudy:
    storage = coord.make_storage(sweep.storage_url, heartbeat_seconds=sweep.heartbeat_seconds)
    return coord.open_study(storage, stage, coord.make_pruner(sweep.pruner), sweep.seed)


def run_stage_worker(sweep: SweepConfig, stage: coord.Stage, base: str | None, configs: trials.TrialConfigs,
                     execute: Execute | None = None, ss: coord.StageStudy | None = None) -> None:
    ss = ss or _open(sweep, stage)
    # Several workers print plain lines side by side; a live display needs the terminal to itself.
    progress = StageProgress(stage.name, len(stage.grid), points_done(ss), sweep.workers,
                             tty=sys.stdout.isatty() and sweep.workers == 1)
    try:
        coord.work(ss, TrialRunner(sweep, stage, base, configs, progress, execute))
    finally:
        progress.close()


def _gpu_env(worker: int, per_trial: int) -> dict[str, str]:
    """Pin worker `worker` to its own GPUs (none on a CPU machine)."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return {}
    ids = [(worker * per_trial + k) % n for k in range(per_trial)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}


def _check_base(ss: coord.StageStudy, base: str) -> None:
    started_from = ss.study.user_attrs.get("base_candidate")
    if started_from is None:
        ss.study.set_user_attr("base_candidate", base)
    elif started_from != base:
        raise ConfigError(
            f"{ss.stage.study_name} was started from '{started_from}' but stage 1 now selects '{base}' (did the "
            "sweep config change?). Use a new sweep name, or delete the stage-2 study to redo it."
        )


def _check_folds(ss: coord.StageStudy, sweep: SweepConfig) -> None:
    """A study's fold runs belong to one fold assignment: resuming it with another `cv.folds` would mix them."""
    folds = sweep.cv.folds if sweep.cv.enabled else 0
    started_with = ss.study.user_attrs.get("cv_folds")
    if started_with is None:
        if not coord.finished(ss.study) or folds == 0:  # an older study (no record) ran without CV
            ss.study.set_user_attr("cv_folds", folds)
        started_with = ss.study.user_attrs.get("cv_folds", 0)
    if started_with != folds:
        raise ConfigError(
            f"{ss.stage.study_name} was run with cv.folds {started_with} but the sweep now says {folds}: its trials "
            "belong to another split of the data. Use a new sweep name for the new cross-validation."
        )


def run_stage(sweep: SweepConfig, stage: coord.Stage, base: str | None, configs: trials.TrialConfigs,
              execute: Execute | None = None) -> coord.StageStudy:
    """Make sure the stage's grid is enqueued, then work on it with `sweep.workers` processes."""
    ss = _open(sweep, stage)
    _check_folds(ss, sweep)
    if base is not None:
        _check_base(ss, base)
    before = {coord.INTERRUPTED: 0, "failed": 0}
    for point in coord.grid_status(ss):
        before[point.state] = before.get(point.state, 0) + 1
    added = coord.ensure_grid(ss, sweep.retry_failed)
    print(f"[sweep] {stage.name}: {len(stage.grid)} grid points, {added} newly enqueued "
          f"({before[coord.INTERRUPTED]} interrupted before), {before.get('finished', 0)} finished before", flush=True)
    if before["failed"] and not sweep.retry_failed:
        print(f"[sweep] {stage.name}: {before['failed']} trials failed with an error; rerun with --retry_failed true "
              "to retry them", flush=True)
    if sweep.workers == 1:
        run_stage_worker(sweep, stage, base, configs, execute, ss)
    else:
        per_trial = isolation.devices(configs.shared)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(_as_dict(sweep), stage.name, base, _gpu_env(i, per_trial)))
                 for i in range(sweep.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    return ss


def _as_dict(sweep: SweepConfig) -> dict:
    return asdict(sweep)


def _reachable_run_dir(out: Path, trial: FrozenTrial) -> str | None:
    """A trial's run directory as this process reaches it: relative to this sweep folder, or, for a trial that
    another sweep command (another output folder on this machine or on a shared file system) trained, the
    absolute path recorded with it. A run on another machine's own disk stays relative and unreachable."""
    relative = trial.user_attrs.get("run_dir")
    elsewhere = trial.user_attrs.get("sweep_dir")
    if relative is None or (out / relative).exists() or not elsewhere or not (Path(elsewhere) / relative).exists():
        return relative
    return str(Path(elsewhere) / relative)


def trial_frame(study: optuna.Study, stage: coord.Stage, out: Path = Path(".")) -> pl.DataFrame:
    """One row per finished (COMPLETE) trial: grid keys, repeat, fold, metrics, params, run dir (relative to
    the sweep folder `out`, or absolute for a trial trained in another folder, see `_reachable_run_dir`)."""
    rows = []
    grid = {stage.key(p) for p in stage.grid}
    for t in coord.finished(study):
        p = coord.grid_params(t)
        if stage.key(p) not in grid:  # a trial of an earlier grid of this study (e.g. other repeats)
            continue
        rows.append({**{k: p[k] for k in GRID_KEYS[stage.name]}, "repeat": p["repeat"], "fold": p.get("fold"),
                     "trial": t.number, "params": t.user_attrs.get("params", 0), "run_dir": _reachable_run_dir(out, t),
                     "epoch": t.user_attrs.get("epoch"), **t.user_attrs.get("metrics", {})})
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def stage_board(sweep: SweepConfig, study: optuna.Study, stage: coord.Stage) -> tuple[pl.DataFrame, pl.DataFrame]:
    frame = trial_frame(study, stage, sweep.out_dir)
    if frame.is_empty():
        failed = [f"trial {t.number}: {t.user_attrs.get('fail_reason')}" for t in study.get_trials(states=(TrialState.FAIL,))]
        raise SweepError(f"{stage.name}: no trial finished, so there is no winner. Failures:\n  " + "\n  ".join(failed[:20]))
    metrics = [m for m in outputs.LEADERBOARD_METRICS if m in frame.columns]
    keys, folds = GRID_KEYS[stage.name], sweep.cv.folds if sweep.cv.enabled else 1
    samples = crossval.as_samples(frame, keys, folds, sweep.repeats)  # under CV each fold is one sample
    board = ranking.leaderboard(samples, keys, metrics, sweep.selection,
                                expected_repeats=folds if sweep.cv.enabled else sweep.repeats)
    oof = crossval.out_of_fold(frame, board, keys, stage.name, sweep.out_dir) if sweep.cv.enabled else None
    board = compare.compare_stage(samples, board, keys, sweep.selection.rule, sweep.selection.metric, sweep.out_dir,
                                  oof=oof)
    return frame, board


def _stop_if_incomplete(sweep: SweepConfig, ss: coord.StageStudy, summary: dict[str, Any]) -> bool:
    summary.setdefault("incomplete", []).extend(coord.report_incomplete(ss, lambda line: print(line, flush=True)))
    if summary["incomplete"] and not sweep.allow_failures:
        print(f"[sweep] stopping after {ss.stage.name}: no winner is chosen from an incomplete grid (exit code 1). "
              "Pass --allow_failures true to choose one from the finished trials.", flush=True)
        return True
    return False


def run(sweep: SweepConfig, execute: Execute | None = None,
        preflight: Callable[[SweepConfig], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole sweep.

    Args:
        sweep: the sweep config.
        execute: trains one trial config (default: `isolation.execute`, in its own process).
        preflight: checks every trial config before the first trial (default: `preflight.check_in_child`).

    Returns:
        The winner summary written to winner.json, with `incomplete`: the grid points that have no
        finished trial (when there are some and `allow_failures` is off, the sweep stops after that stage
        and the summary has no winner).
    """
    sweep.validate()
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(_as_dict(sweep), sort_keys=False))
    print(f"[sweep] {sweep.name}: storage {sweep.storage_url}", flush=True)
    (preflight or check_in_child)(sweep)
    configs = trials.TrialConfigs(sweep)
    summary: dict[str, Any] = {"sweep": sweep.name}

    s1 = stage1(sweep, configs)
    ss1 = run_stage(sweep, s1, None, configs, execute)
    if _stop_if_incomplete(sweep, ss1, summary):
        return summary
    trials1, board1 = stage_board(sweep, ss1.study, s1)
    base = board1.row(0, named=True)["candidate"]
    print(f"[sweep] stage 1 winner: {base}", flush=True)

    s2 = stage2(sweep, configs)
    ss2 = run_stage(sweep, s2, base, configs, execute)
    if _stop_if_incomplete(sweep, ss2, summary):
        return summary
    trials2, board2 = stage_board(sweep, ss2.study, s2)
    best = board2.row(0, named=True)
    print(f"[sweep] stage 2 winner: {base} + {best['optimizer']} + {best['loss']}", flush=True)

    winner_trials = trials2.filter((pl.col("optimizer") == best["optimizer"]) & (pl.col("loss") == best["loss"]))
    # NaN as null: polars orders NaN above every number, so it would come first under maximize
    winner_trials = winner_trials.sort(pl.col(s2.objective).cast(pl.Float64).fill_nan(None),
                                       descending=s2.direction == "maximize", nulls_last=True)
    winner_row = winner_trials.row(0, named=True)
    winner_dir = out / winner_row["run_dir"]  # stored relative to the sweep folder
    val_from = best if sweep.cv.enabled else winner_row  # under CV: the fold means
    summary.update({
        "base_architecture": base, "optimizer": best["optimizer"], "loss": best["loss"],
        "trial": int(winner_row["trial"]), "run_dir": str(winner_row["run_dir"]), "params": int(winner_row["params"]),
        "selection": sweep.selection.rule,
        "val": {k: v for k, v in val_from.items() if k.startswith(("val/", "train/", "train_eval/")) and "±" not in k},
    })
    test: Callable[[], dict[str, Any]] = lambda: evaluate_on_test(winner_dir)  # noqa: E731
    if not winner_dir.exists():  # trained by a sweep command on another machine (PostgreSQL storage)
        print(f"[sweep] the winner's run {winner_row['run_dir']} was trained by another machine and is not reachable "
              "from here: its test, winner.yaml and winner.ckpt are written by the sweep command there "
              "(or use one shared sweep folder).", flush=True)
        summary["winner_elsewhere"] = True
        stages = {"stage1": (ss1.study, trials1, board1), "stage2": (ss2.study, trials2, board2)}
        _write_outputs(sweep, stages, summary, winner_dir, None)
        return summary
    if sweep.cv.enabled:
        summary["cv"] = {"folds": sweep.cv.folds, "final": sweep.cv.final}
        if sweep.cv.final == "refit":
            cfg, tags = trial_config(configs, s2, {"optimizer": best["optimizer"], "loss": best["loss"], "repeat": 0}, base)
            winner_dir = crossval.refit(sweep, cfg, winner_trials, tags, execute)
            summary["cv"]["refit_epochs"] = crossval.refit_epochs(winner_trials)
            summary["run_dir"] = winner_dir.relative_to(out).as_posix()
        else:
            members = [out / d for d in winner_trials.sort("repeat", "fold")["run_dir"].to_list()]
            summary["cv"]["members"] = [os.path.relpath(m, out) for m in members]
            test = lambda: crossval.ensemble_test(sweep, members, evaluate_on_test)  # noqa: E731
    stages = {"stage1": (ss1.study, trials1, board1), "stage2": (ss2.study, trials2, board2)}
    _write_outputs(sweep, stages, summary, winner_dir, test)
    return summary


def _write_outputs(sweep: SweepConfig, stages: dict[str, tuple], summary: dict[str, Any], winner_dir: Path,
                   test_winner: Callable[[], dict[str, Any]] | None) -> None:
    """Leaderboards, plots, W&B summary and report; the winner's test (`test_winner`), winner.yaml and
    winner.ckpt when its run directory is reachable (`test_winner` None: it is not)."""
    out, winner = sweep.out_dir, RunFiles(winner_dir)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The winner is tested in its own process; meanwhile this one writes what does not depend on the test.
        test = pool.submit(test_winner) if sweep.test_winner and test_winner is not None else None
        if winner.config.exists():
            outputs.write_winner_config(winner.config, out / "winner.yaml", f"{sweep.name}-winner")
        if winner.best_checkpoint.exists():
            shutil.copy2(winner.best_checkpoint, out / files.WINNER_CKPT)
            shutil.copy2(winner.model_info, out / "winner_model.json")
        outputs.write_boards(sweep, out, stages)
        wandb_run = outputs.start_wandb_summary(sweep, out, stages)
        try:
            if test is not None:
                summary["test"] = test.result()
                if summary["test"].get("checkpoint"):  # paths in winner.json are relative to the sweep folder
                    summary["test"]["checkpoint"] = os.path.relpath(summary["test"]["checkpoint"], out)
        finally:
            outputs.finish_wandb_summary(wandb_run, summary)
    RunFiles(out).write_json(files.WINNER, summary)
    outputs.write_report(sweep, out, stages, summary)
    print(f"[sweep] done: {out}/report.md, winner config {out}/winner.yaml", flush=True)


def exit_code(sweep: SweepConfig, summary: dict[str, Any]) -> int:
    """0, or 1 when some grid point has no finished trial and `allow_failures` is off."""
    return 1 if summary.get("incomplete") and not sweep.allow_failures else 0


def evaluate_on_test(run_dir: Path) -> dict[str, Any]:
    """Evaluate a finished trial once on the test split (as `cli.py test` does); reuse an earlier result."""
    run = RunFiles(run_dir)
    if not run.test_metrics.exists():
        # One device: a single ordered pass over the test split. (A DDP launcher would also re-execute this
        # process's command line, which is the sweep's, not `cli.py test`.) The run directory as it is found
        # now, not as its config.yaml recorded it: a moved or copied sweep folder writes into itself.
        single = ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.num_nodes=1", f"--run.dir={Path(run_dir).resolve()}"]
        outcome = isolation.run_in_process("test", {"config_path": str(run.config), "extra": single}, run_dir)
        if outcome.status != "ok":
            raise SweepError(f"testing the winner failed: {outcome.reason} (log: {run_dir / 'test.log'})")
    return run.read_json(files.TEST_METRICS)
