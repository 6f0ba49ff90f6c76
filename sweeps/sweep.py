"""The two-stage model selection of study 002 as a resumable, parallel Optuna sweep, in order.

Stage 1 trains every candidate architecture with the shared defaults and picks the base architecture;
stage 2 trains that winner with every optimizer x loss pair and picks the pair; the final winner is then
evaluated once on the untouched test split. Each stage is an Optuna study in one storage (`sweeps.worker`);
the winner rule is applied afterwards to the metrics stored on the trials (`sweeps.selection`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml

from sweeps import budget, crossval, grid, jobs, outputs, schedule, selection, trials, worker
from sweeps import coordinator as coord
from sweeps.config import SweepConfig
from sweeps.log import log
from sweeps.selection import Winner
from sweeps.worker import Execute


def run(sweep: SweepConfig, execute: Execute | None = None,
        preflight: Callable[[SweepConfig], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole sweep.

    Args:
        sweep: the sweep config.
        execute: trains one trial config (default: `jobs.execute`, in its own process).
        preflight: checks every trial config before the first trial (default: `jobs.check_in_child`).

    Returns:
        The winner summary written to winner.json, with `incomplete`: the grid points that have no
        finished trial (when there are some and `allow_failures` is off, the sweep stops after that stage
        and the summary has no winner).
    """
    sweep.validate()
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    (sweep.out_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
    log.info(f"[sweep] {sweep.name}: storage {sweep.storage_url}")
    (preflight or jobs.check_in_child)(sweep)
    configs = trials.TrialConfigs(sweep)
    sweep = budget.announce(sweep, configs, coord.make_storage(sweep.storage_url), schedule.CONTINUES)
    incomplete: list[dict[str, str]] = []

    stage1 = grid.stage1(sweep, list(configs.candidates), configs.shared)
    ss1 = worker.run_stage(sweep, stage1, None, configs, execute)
    if _stop_if_incomplete(sweep, ss1, incomplete):
        return {"sweep": sweep.name, "incomplete": incomplete}
    first = selection.stage_result(sweep, ss1)
    base = first.best["candidate"]
    log.info(f"[sweep] stage 1 winner: {base}")

    ss2 = worker.run_stage(sweep, grid.stage2(sweep, configs.shared), base, configs, execute)
    if _stop_if_incomplete(sweep, ss2, incomplete):
        return {"sweep": sweep.name, "incomplete": incomplete}
    second = selection.stage_result(sweep, ss2)
    winner = selection.pick_winner(sweep, first, second, incomplete)
    log.info(f"[sweep] stage 2 winner: {base} + {winner.optimizer} + {winner.loss}")

    test_winner = _final_model(sweep, configs, second.stage, winner, execute)
    outputs.write(sweep, [first, second], winner, test_winner)
    return winner.to_json()


def _stop_if_incomplete(sweep: SweepConfig, ss: coord.StageStudy, incomplete: list[dict[str, str]]) -> bool:
    incomplete.extend(coord.report_incomplete(ss))
    if incomplete and not sweep.allow_failures:
        log.warning(f"[sweep] stopping after {ss.stage.name}: no winner is chosen from an incomplete grid (exit code 1). "
                    "Pass --allow_failures true to choose one from the finished trials.")
        return True
    return False


def _final_model(sweep: SweepConfig, configs: trials.TrialConfigs, stage2: grid.Stage, winner: Winner,
                 execute: Execute | None) -> Callable[[], dict[str, Any]] | None:
    """The final model (the winner's run; under CV its refit or its fold models' ensemble) and how to test it
    (None: its run is not reachable from here). Records on `winner` what the final model is."""
    out, winner_dir = sweep.out_dir, sweep.out_dir / winner.run_dir  # run_dir: relative to the sweep folder
    if not winner_dir.exists():  # trained by a sweep command on another machine (PostgreSQL storage)
        log.info(f"[sweep] the winner's run {winner.run_dir} was trained by another machine and is not reachable "
                 "from here: its test, winner.yaml and winner.ckpt are written by the sweep command there "
                 "(or use one shared sweep folder).")
        winner.winner_elsewhere = True
        return None
    if not sweep.cv.enabled:
        return lambda: jobs.evaluate_on_test(winner_dir)
    winner.cv = {"folds": sweep.cv.folds, "final": sweep.cv.final}
    if sweep.cv.final == "refit":
        point = {"optimizer": winner.optimizer, "loss": winner.loss, "repeat": 0}
        cfg, tags = worker.trial_config(configs, stage2, point, winner.base_architecture)
        refit_dir = crossval.refit(sweep, cfg, winner.runs, tags, execute)
        winner.cv["refit_epochs"] = crossval.refit_epochs(winner.runs)
        winner.run_dir = refit_dir.relative_to(out).as_posix()
        return lambda: jobs.evaluate_on_test(refit_dir)
    members = [out / d for d in winner.runs.sort("repeat", "fold")["run_dir"].to_list()]
    winner.cv["members"] = [os.path.relpath(m, out) for m in members]
    return lambda: crossval.ensemble_test(sweep, members, jobs.evaluate_on_test)


def exit_code(sweep: SweepConfig, summary: dict[str, Any]) -> int:
    """0, or 1 when some grid point has no finished trial and `allow_failures` is off."""
    return 1 if summary.get("incomplete") and not sweep.allow_failures else 0
