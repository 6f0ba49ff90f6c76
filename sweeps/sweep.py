"""The two-stage model selection of study 002 as a resumable, parallel Optuna sweep.

Stage 1 trains every candidate architecture with the shared defaults and picks the base architecture;
stage 2 trains that winner with every optimizer x loss pair and picks the pair; the final winner is then
evaluated once on the untouched test split. Each stage is an Optuna study in one storage; the winner rule
is applied afterwards to the metrics stored on the trials (see `sweeps.ranking`).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import polars as pl
import yaml
from optuna.trial import FrozenTrial, TrialState

from errors import ConfigError
from sweeps import coordinator as coord
from sweeps import isolation, outputs, ranking, trials
from errors import SweepError
from sweeps.config import Candidate, SweepConfig

GRID_KEYS = {"stage1": ["candidate"], "stage2": ["optimizer", "loss"]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:60]


def _objective(sweep: SweepConfig, run_cfg: dict[str, Any]) -> tuple[str, str]:
    """The metric told to Optuna (and used for pruning): the selection metric, or the run's monitor."""
    if sweep.selection.rule == "metric":
        return sweep.selection.metric, sweep.selection.direction
    run = run_cfg.get("run", {}) or {}
    return run.get("monitor", "val/loss"), "maximize" if run.get("mode") == "max" else "minimize"


def stage1(sweep: SweepConfig) -> coord.Stage:
    objective, direction = _objective(sweep, trials.base_trial_config(sweep))
    grid = [{"candidate": c.name, "repeat": r} for r in range(sweep.repeats) for c in sweep.stage1.candidates]
    return coord.Stage("stage1", f"{sweep.name}/stage1", grid, objective, direction)


def stage2(sweep: SweepConfig) -> coord.Stage:
    objective, direction = _objective(sweep, trials.base_trial_config(sweep))
    grid = [{"optimizer": o, "loss": loss, "repeat": r} for r in range(sweep.repeats)
            for o in sweep.stage2.optimizers for loss in sweep.stage2.losses]
    return coord.Stage("stage2", f"{sweep.name}/stage2", grid, objective, direction)


def _candidate(sweep: SweepConfig, name: str) -> Candidate:
    return next(c for c in sweep.stage1.candidates if c.name == name)


def trial_config(sweep: SweepConfig, stage: coord.Stage, params: dict[str, Any], base: str | None) -> tuple[dict, list[str]]:
    """The fit config of one grid point and its W&B tags."""
    if stage.name == "stage1":
        cand = _candidate(sweep, params["candidate"])
        cfg = trials.candidate_config(sweep, cand)
    else:
        cand = _candidate(sweep, base)
        cfg = trials.stage2_config(sweep, cand, params["optimizer"], params["loss"])
    opt = cfg["model"]["optimizer"]
    opt_name = opt.get("class_path", "").rsplit(".", 1)[-1] if isinstance(opt, dict) else str(opt)
    tags = [f"arch:{cand.name}", f"optimizer:{opt_name}", f"loss:{cfg['model'].get('loss', 'ce')}", f"repeat:{params['repeat']}"]
    return cfg, tags


def _multi_device(cfg: dict[str, Any]) -> int:
    devices = (cfg.get("trainer") or {}).get("devices", 1)
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int):
        return devices
    return 1


class TrialRunner:
    """Runs one claimed trial in an isolated process and records its outcome on the Optuna trial."""

    def __init__(self, sweep: SweepConfig, stage: coord.Stage, base: str | None = None):
        self.sweep, self.stage, self.base = sweep, stage, base

    def __call__(self, study: optuna.Study, frozen: FrozenTrial) -> None:
        storage, tid = study._storage, frozen._trial_id
        params = coord.grid_params(frozen)
        trial = optuna.trial.Trial(study, tid)
        for name, values in self.stage.search_space().items():
            trial.suggest_categorical(name, values)
        label = "-".join(str(params[k]) for k in GRID_KEYS[self.stage.name])
        run_dir = self.sweep.out_dir / "trials" / self.stage.name / f"{frozen.number:03d}-{_slug(label)}-r{params['repeat']}"
        if run_dir.exists():  # a retried trial number never reuses a directory, but be safe on manual edits
            shutil.rmtree(run_dir)
        cfg, tags = trial_config(self.sweep, self.stage, params, self.base)
        pruning = None
        if self.sweep.pruner != "none":
            pruning = {"storage": self.sweep.storage_url, "study_name": self.stage.study_name, "trial_id": tid,
                       "monitor": self.stage.objective, "pruner": self.sweep.pruner, "max_epochs": _max_epochs(self.sweep)}
        cfg = trials.finalize(cfg, self.sweep, run_dir, self.stage.name, self.sweep.seed + params["repeat"], tags, pruning)
        storage.set_trial_user_attr(tid, "run_dir", str(run_dir))
        print(f"[sweep] {self.stage.name} trial {frozen.number}: {label} repeat {params['repeat']} -> {run_dir}", flush=True)
        started = time.perf_counter()
        with coord.Heartbeat(study, tid, self.sweep.heartbeat_seconds):
            if _multi_device(cfg) > 1:
                outcome = isolation.run_in_subprocess(cfg, run_dir)
            else:
                outcome = isolation.run_in_process("fit", {"config": cfg}, run_dir)
        seconds = time.perf_counter() - started
        storage.set_trial_user_attr(tid, "seconds", round(seconds, 2))
        timing = run_dir / "timing.json"
        if timing.exists():  # train+validation loop time; the rest of `seconds` is the trial's fixed cost
            storage.set_trial_user_attr(tid, "train_seconds", round(json.loads(timing.read_text())["train_seconds"], 2))
        if outcome.status != "ok":
            storage.set_trial_user_attr(tid, "fail_reason", outcome.reason)
            study.tell(trial, state=TrialState.FAIL)
            print(f"[sweep] {self.stage.name} trial {frozen.number} FAILED ({seconds:.0f}s): {outcome.reason}", flush=True)
            return
        monitor = cfg.get("run", {}).get("monitor", "val/loss")
        mode = cfg.get("run", {}).get("mode", "min")
        try:
            summary = trials.summarize(run_dir, self.sweep.selection.epoch, monitor, mode)
        except RuntimeError as e:
            storage.set_trial_user_attr(tid, "fail_reason", str(e))
            study.tell(trial, state=TrialState.FAIL)
            return
        for key in ("metrics", "params", "epoch", "epochs_run", "checkpoint"):
            storage.set_trial_user_attr(tid, key, summary[key])
        if (run_dir / "pruned.json").exists():
            study.tell(trial, state=TrialState.PRUNED)
            print(f"[sweep] {self.stage.name} trial {frozen.number} pruned after {summary['epochs_run']} epochs", flush=True)
            return
        value = summary["metrics"].get(self.stage.objective)
        if value is None:
            storage.set_trial_user_attr(tid, "fail_reason", f"objective '{self.stage.objective}' was not logged")
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, value)
        print(f"[sweep] {self.stage.name} trial {frozen.number} done in {seconds:.0f}s: {self.stage.objective}={value:.4f}", flush=True)


def _worker_main(sweep_dict: dict, stage_name: str, base: str | None, env: dict[str, str]) -> None:
    os.environ.update(env)
    from sweeps.cli import sweep_from_dict

    isolation.start_forkserver()
    sweep = sweep_from_dict(sweep_dict)
    run_stage_worker(sweep, stage1(sweep) if stage_name == "stage1" else stage2(sweep), base)


def _max_epochs(sweep: SweepConfig) -> int:
    return int((trials.base_trial_config(sweep).get("trainer") or {}).get("max_epochs") or 15)


def _open(sweep: SweepConfig, stage: coord.Stage) -> optuna.Study:
    pruner = coord.make_pruner(sweep.pruner, _max_epochs(sweep))
    return coord.open_study(coord.make_storage(sweep.storage_url), stage, pruner, sweep.seed)


def run_stage_worker(sweep: SweepConfig, stage: coord.Stage, base: str | None) -> None:
    study = _open(sweep, stage)
    coord.work(study, stage, TrialRunner(sweep, stage, base), grace_seconds=6 * sweep.heartbeat_seconds)


def _gpu_env(worker: int, per_trial: int) -> dict[str, str]:
    """Pin worker `worker` to its own GPUs (none on a CPU machine)."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return {}
    ids = [(worker * per_trial + k) % n for k in range(per_trial)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}


def run_stage(sweep: SweepConfig, stage: coord.Stage, base: str | None) -> optuna.Study:
    """Make sure the stage's grid is enqueued, then work on it with `sweep.workers` processes."""
    study = _open(sweep, stage)
    if base is not None:
        started_from = study.user_attrs.get("base_candidate")
        if started_from is None:
            study.set_user_attr("base_candidate", base)
        elif started_from != base:
            raise ConfigError(
                f"{stage.study_name} was started from '{started_from}' but stage 1 now selects '{base}' (did the "
                "sweep config change?). Use a new sweep name, or delete the stage-2 study to redo it."
            )
    added = coord.ensure_grid(study, stage, sweep.retry_failed)
    done = len(coord.finished(study, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
    print(f"[sweep] {stage.name}: {len(stage.grid)} grid points, {added} newly enqueued, {done} trials finished before", flush=True)
    if sweep.workers == 1:
        run_stage_worker(sweep, stage, base)
    else:
        per_trial = _multi_device(trials.base_trial_config(sweep))
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(_as_dict(sweep), stage.name, base, _gpu_env(i, per_trial)))
                 for i in range(sweep.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    return study


def _as_dict(sweep: SweepConfig) -> dict:
    return asdict(sweep)


def trial_frame(study: optuna.Study, stage: coord.Stage) -> pl.DataFrame:
    """One row per finished (COMPLETE) trial: grid keys, repeat, metrics, params, run dir."""
    rows = []
    for t in coord.finished(study):
        p = coord.grid_params(t)
        rows.append({**{k: p[k] for k in GRID_KEYS[stage.name]}, "repeat": p["repeat"], "trial": t.number,
                     "params": t.user_attrs.get("params", 0), "run_dir": t.user_attrs.get("run_dir"),
                     **t.user_attrs.get("metrics", {})})
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def stage_board(sweep: SweepConfig, study: optuna.Study, stage: coord.Stage) -> tuple[pl.DataFrame, pl.DataFrame]:
    frame = trial_frame(study, stage)
    if frame.is_empty():
        failed = [f"trial {t.number}: {t.user_attrs.get('fail_reason')}" for t in study.get_trials(states=(TrialState.FAIL,))]
        raise SweepError(f"{stage.name}: no trial finished, so there is no winner. Failures:\n  " + "\n  ".join(failed[:20]))
    metrics = [m for m in outputs.LEADERBOARD_METRICS if m in frame.columns]
    board = ranking.leaderboard(frame, GRID_KEYS[stage.name], metrics, sweep.selection, expected_repeats=sweep.repeats)
    return frame, board


def run(sweep: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the whole sweep; returns the winner summary written to winner.json."""
    sweep.validate()
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(_as_dict(sweep), sort_keys=False))
    print(f"[sweep] {sweep.name}: storage {sweep.storage_url}", flush=True)

    s1 = stage1(sweep)
    study1 = run_stage(sweep, s1, None)
    trials1, board1 = stage_board(sweep, study1, s1)
    base = board1.row(0, named=True)["candidate"]
    print(f"[sweep] stage 1 winner: {base}", flush=True)

    s2 = stage2(sweep)
    study2 = run_stage(sweep, s2, base)
    trials2, board2 = stage_board(sweep, study2, s2)
    best = board2.row(0, named=True)
    print(f"[sweep] stage 2 winner: {base} + {best['optimizer']} + {best['loss']}", flush=True)

    winner_trials = trials2.filter((pl.col("optimizer") == best["optimizer"]) & (pl.col("loss") == best["loss"]))
    winner_trials = winner_trials.sort(s2.objective, descending=s2.direction == "maximize", nulls_last=True)
    winner_row = winner_trials.row(0, named=True)
    winner_dir = Path(winner_row["run_dir"])
    summary: dict[str, Any] = {
        "sweep": sweep.name, "base_architecture": base, "optimizer": best["optimizer"], "loss": best["loss"],
        "trial": int(winner_row["trial"]), "run_dir": str(winner_dir), "params": int(winner_row["params"]),
        "selection": sweep.selection.rule, "val": {k: v for k, v in winner_row.items() if k.startswith(("val/", "train/"))},
    }
    stages = {"stage1": (study1, trials1, board1), "stage2": (study2, trials2, board2)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The winner is tested in its own process; meanwhile this one writes what does not depend on the test.
        test = pool.submit(evaluate_on_test, winner_dir) if sweep.test_winner else None
        outputs.write_winner_config(winner_dir / "config.yaml", out / "winner.yaml", f"{sweep.name}-winner")
        ckpt = winner_dir / "checkpoints" / "best.ckpt"
        if ckpt.exists():
            shutil.copy2(ckpt, out / "winner.ckpt")
            shutil.copy2(winner_dir / "model.json", out / "winner_model.json")
        outputs.write_boards(sweep, out, stages)
        wandb_run = outputs.start_wandb_summary(sweep, out, stages)
        try:
            if test is not None:
                summary["test"] = test.result()
        finally:
            outputs.finish_wandb_summary(wandb_run, summary)
    (out / "winner.json").write_text(json.dumps(summary, indent=2, default=str))
    outputs.write_report(sweep, out, stages, summary)
    print(f"[sweep] done: {out}/report.md, winner config {out}/winner.yaml", flush=True)
    return summary


def evaluate_on_test(run_dir: Path) -> dict[str, Any]:
    """Evaluate a finished trial once on the test split (as `cli.py test` does); reuse an earlier result."""
    result = run_dir / "test_metrics.json"
    if not result.exists():
        # One device: a single ordered pass over the test split. (A DDP launcher would also re-execute this
        # process's command line, which is the sweep's, not `cli.py test`.)
        single = ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.num_nodes=1"]
        outcome = isolation.run_in_process("test", {"config_path": str(run_dir / "config.yaml"), "extra": single}, run_dir)
        if outcome.status != "ok":
            raise SweepError(f"testing the winner failed: {outcome.reason} (log: {run_dir / 'test.log'})")
    return json.loads(result.read_text())
