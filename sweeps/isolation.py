"""Run each trial in its own process, so an exception, NaN loss, out-of-memory or crash fails that trial only.

Single-device trials fork from a forkserver that has torch, lightning and timm imported already, so a
trial's fixed start-up cost is a fork, not a Python start and a torch import. Multi-device trials run as
`python cli.py fit --config <trial config>`: Lightning's DDP launcher re-executes that command per rank.
A sweep's preflight (`sweeps.preflight.check`) runs the same way as a "check" job, so the coordinator never
imports torch. A process that dies by a signal without writing its result is `interrupted`, not `failed`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "lightning.pytorch", "timm", "torchmetrics", "albumentations", "polars", "wandb",
           "wandb.sdk.launch",  # imported lazily by every wandb.init (~1-2 s): import it once, here
           "evaluation.cli", "datamodules", "sweeps.isolation"]


@dataclass
class Outcome:
    """How a trial process ended, with a reason a user can read.

    `interrupted`: the process died by a signal (SIGKILL, the OOM killer) without a result; such trials
    are retried on the next run. `failed`: it raised or exited with an error; retried only on request.
    """

    status: str  # "ok" | "failed" | "interrupted"
    reason: str = ""


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_forkserver() -> None:
    """Start the pre-importing forkserver now, in the background: its imports of torch, lightning and timm
    then overlap with whatever this process does before the first trial."""
    _context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


def share_wandb_service(mode: str | None) -> None:
    """Start one W&B service for this process and every trial process it forks (they find it through the
    environment), instead of one per trial. Call before `start_forkserver`."""
    if (mode or os.environ.get("WANDB_MODE", "offline")) == "disabled":
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    wandb.setup()


def _finish_wandb() -> None:
    """Forked children leave through os._exit, which skips W&B's exit hook: finish the run explicitly."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _die_with_worker(worker: int) -> None:
    """An orphaned trial (its worker was killed) stops instead of training on unobserved. The worker is not
    this process's parent (the forkserver is), so its pid is watched directly."""

    def watch():
        while True:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _redirect_output(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload))


def _child(job: str, payload: Any, result_file: str, log_file: str, worker: int) -> None:
    _die_with_worker(worker)
    _redirect_output(Path(log_file))
    os.chdir(payload.get("cwd", os.getcwd()) if isinstance(payload, dict) else os.getcwd())
    try:
        from datamodules.images import allow_large_scans

        allow_large_scans()
        from evaluation.cli import (
            EvaluationCLI,  # the CLI behind `cli.py fit/test`: the test writes the report
        )

        if job == "fit":
            cli = EvaluationCLI(args=payload["config"], run=False)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        elif job == "check":  # a sweep's preflight, away from the coordinator's light process
            from sweeps.cli import sweep_from_dict
            from sweeps.preflight import check

            check(sweep_from_dict(payload["sweep"]))
        else:  # test a finished run with its best checkpoint, exactly as `cli.py test --config` does
            EvaluationCLI(args=["test", "--config", payload["config_path"], "--trainer.enable_progress_bar=false",
                                *payload.get("extra", [])])
        _finish_wandb()
        _write(Path(result_file), {"status": "ok"})
    except BaseException as e:  # noqa: BLE001 -- every failure becomes the trial's recorded reason
        traceback.print_exc()
        from errors import MedselError

        reason = str(e) if isinstance(e, MedselError) else f"{type(e).__name__}: {e}"[:2000]
        _write(Path(result_file), {"status": "failed", "reason": reason})
        try:
            _finish_wandb()
        except Exception:  # noqa: BLE001 -- the trial has failed already; its reason is recorded
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def run_in_process(job: str, payload: dict[str, Any], workdir: Path) -> Outcome:
    """Run a fit or test job in a forked child; returns how it ended."""
    workdir.mkdir(parents=True, exist_ok=True)
    result_file = workdir / f".{job}_result.json"
    result_file.unlink(missing_ok=True)
    ctx = _context()
    proc = ctx.Process(target=_child, args=(job, {**payload, "cwd": os.getcwd()}, str(result_file), str(workdir / f"{job}.log"), os.getpid()))
    proc.start()
    proc.join()
    return outcome_of(result_file, proc.exitcode, workdir / f"{job}.log")


def run_in_subprocess(config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run a fit as `python cli.py fit --config` (needed for DDP trials: its launcher re-executes the command)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "trial_config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = workdir / "fit.log"
    with open(log, "ab") as fh:
        proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--config", str(cfg_path)],
                              stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode == 0:
        return Outcome("ok")
    return outcome_of(None, proc.returncode, log)


def devices(config: dict[str, Any]) -> int:
    """How many devices a fit config trains on (`trainer.devices`: a count, a list, or "auto" = 1)."""
    value = (config.get("trainer") or {}).get("devices", 1)
    return len(value) if isinstance(value, list) else value if isinstance(value, int) else 1


def execute(config: dict[str, Any], run_dir: Path) -> Outcome:
    """Train one trial config in its own process: forked for one device, `cli.py fit` for several."""
    if devices(config) > 1:
        return run_in_subprocess(config, run_dir)
    return run_in_process("fit", {"config": config}, run_dir)


def _reason_from_log(log: Path, code: int | None) -> str:
    tail = log.read_text(errors="replace").strip().splitlines()[-30:] if log.exists() else []
    error_lines = [line for line in tail if "Error" in line or "error:" in line or "Exception" in line]
    return (error_lines[-1] if error_lines else f"exit code {code}")[:2000]


def outcome_of(result_file: Path | None, exitcode: int | None, log: Path) -> Outcome:
    """How a trial process ended: its own result file if it wrote one; else a death by a signal
    (negative exit code) is an interruption, anything else a failure with the log's last error line."""
    if result_file is not None and result_file.exists():
        data = json.loads(result_file.read_text())
        return Outcome(data["status"], data.get("reason", ""))
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        why = " (out of memory, or killed from outside)" if sig == 9 else ""
        return Outcome("interrupted", f"killed by signal {sig}{why}")
    return Outcome("failed", _reason_from_log(log, exitcode))
