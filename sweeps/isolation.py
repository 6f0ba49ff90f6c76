"""Run a function in its own process, so an exception, NaN loss, out-of-memory or crash ends that process only.

Generic: it runs any module-level function by reference and imports nothing from `sweeps` (the sweep's jobs
are in `sweeps.jobs`). Functions run in a child forked from a forkserver that has imported the caller's
`preload` modules already (torch, lightning, timm), so a child's fixed start-up cost is a fork, not a Python
start and a torch import; `run_command` runs a command line instead (what DDP's launcher needs). A process
that dies by a signal without writing its result is `interrupted`, not `failed`.

Each child leads its own process group (with its data-loader workers, or a command's DDP ranks), so a
terminal's Ctrl-C reaches only the caller, which stops its children with `stop_children` (SIGTERM to each
group, SIGKILL after `GRACE_SECONDS`); a child stopped so records itself `interrupted`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import MedselError
from runs import interrupts
from runs.wandb_mode import wandb_mode

_PRELOAD: list[str] = []
GRACE_SECONDS = 5.0  # a stopped child's time to finish its W&B run and exit before it is killed
_CHILDREN: set[int] = set()  # the process groups this process has running (their leaders' pids)
_STOPPED: set[int] = set()  # those `stop_children` has asked to stop already


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
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


# The variables of an `srun`-launched task. A sweep worker inside a SLURM job (submitit starts it with srun)
# has them; a trial it starts must not: Lightning's SLURMEnvironment.detect() is "SLURM_NTASKS is set", and
# would then take a 2-device trial for a 2-task srun job and wait for a second task that never comes. Without
# them Lightning picks its own LightningEnvironment and launches the DDP ranks itself, on the job's GPUs
# (CUDA_VISIBLE_DEVICES is kept). The worker process keeps them: submitit's requeue reads them.
_SRUN_TASK_VARS = re.compile(r"^SLURM_(NTASKS\w*|NPROCS|PROCID|LOCALID|NODEID|STEP_\w+|TASKS_PER_NODE|SRUN_COMM_\w+|"
                             r"CPU_BIND\w*|DISTRIBUTION|LAUNCH_NODE_IPADDR|UMASK|PRIO_PROCESS|GTIDS|TASK_PID)$")


def trial_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a trial process gets: this one without the srun task variables (see above)."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if not _SRUN_TASK_VARS.match(k)}


def start_forkserver(preload: list[str]) -> None:
    """Start the forkserver now, in the background, importing the modules `preload`: its imports of torch,
    lightning and timm then overlap with whatever this process does before the first child. The modules
    that hold the functions run later belong in `preload` (a child unpickles a function by its module).
    Its children inherit its environment: the trial environment (`trial_environ`)."""
    _PRELOAD[:] = preload
    _context()
    from multiprocessing import forkserver

    dropped = {k: os.environ.pop(k) for k in set(os.environ) - set(trial_environ())}
    try:
        forkserver.ensure_running()
    finally:
        os.environ.update(dropped)


def share_wandb_service(mode: str | None) -> None:
    """Start one W&B service for this process and every trial process it forks (they find it through the
    environment), instead of one per trial. Call before `start_forkserver`."""
    if wandb_mode(mode) == "disabled":
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


def _child(target: Callable[[Any], None], payload: Any, result_file: str, log_file: str, worker: int,
           cwd: str) -> None:
    os.setpgid(0, 0)  # its own process group: the caller stops it with its data-loader workers
    # A repeated stop request must not cut short the writing of its result: the caller kills it if it lingers.
    interrupts.install(second="ignore")
    _die_with_worker(worker)
    _redirect_output(Path(log_file))
    os.chdir(cwd)
    try:
        target(payload)
        _finish_wandb()
        _write(Path(result_file), {"status": "ok"})
    except BaseException as e:  # noqa: BLE001 -- every failure becomes the recorded reason
        stopped = isinstance(e, interrupts.Interrupted)
        if stopped:
            print(f"{interrupts.message(e, 'this process')}", flush=True)
        else:
            traceback.print_exc()
        reason = str(e) if isinstance(e, MedselError) else f"{type(e).__name__}: {e}"[:2000]
        _write(Path(result_file), {"status": "interrupted", "reason": f"stopped by {e.name}"} if stopped
               else {"status": "failed", "reason": reason})
        try:
            _finish_wandb()
        except BaseException:  # noqa: BLE001 -- the child has ended already; its reason is recorded
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.exit_code if stopped else 1)


def stop_children(signum: int = signal.SIGTERM) -> None:
    """Ask every child process group this process runs to stop (SIGTERM), and kill the groups still alive
    `GRACE_SECONDS` later. Safe to call from a signal handler: it only sends signals and starts a thread."""
    groups = list(_CHILDREN)
    for pgid in groups:
        _STOPPED.add(pgid)
        _signal_group(pgid, signal.SIGTERM)

    def kill_late() -> None:
        time.sleep(GRACE_SECONDS)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)

    if groups:
        threading.Thread(target=kill_late, daemon=True).start()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # already gone (its pid not yet reused: we still wait on it)
        pass


def _stop_and_wait(pgid: int, wait: Callable[[float], bool]) -> None:
    """After an exception in the caller (an interrupt): stop the child's group and wait for it to end."""
    if pgid not in _STOPPED:  # not asked by `stop_children` yet (another exception, or a worker thread's child)
        _signal_group(pgid, signal.SIGTERM)
    if not wait(GRACE_SECONDS):
        _signal_group(pgid, signal.SIGKILL)
        wait(GRACE_SECONDS)


def run_in_process(target: Callable[[Any], None], payload: Any, workdir: Path, name: str) -> Outcome:
    """Run `target(payload)` in a child forked from the forkserver, its output in `<workdir>/<name>.log`.

    Args:
        target: a module-level function (the child finds it by its module and name).
        payload: its one argument (picklable).
        workdir: where the log and the result file go.
        name: the job's name, e.g. "fit": `fit.log`, `.fit_result.json`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result_file, log = workdir / f".{name}_result.json", workdir / f"{name}.log"
    result_file.unlink(missing_ok=True)
    proc = _context().Process(target=_child, args=(target, payload, str(result_file), str(log), os.getpid(), os.getcwd()))
    proc.start()
    _CHILDREN.add(proc.pid)
    try:
        proc.join()
    except BaseException:  # an interrupt while waiting: the child must not train on unobserved
        _stop_and_wait(proc.pid, lambda seconds: proc.join(seconds) or proc.exitcode is not None)
        raise
    finally:
        _CHILDREN.discard(proc.pid)
        stopped = proc.pid in _STOPPED
        _STOPPED.discard(proc.pid)
    if proc.exitcode == 255:  # "status unknown": the forkserver died (SLURM signals a whole job), not the child
        _wait_gone(proc.pid, GRACE_SECONDS)  # which may still be writing its result
    return outcome_of(result_file, proc.exitcode, log, stopped)


def _wait_gone(pid: int, seconds: float) -> None:
    """Wait until process `pid` (not our child: the forkserver's) has ended, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # the pid was reused by another user's process: ours has ended
            return
        time.sleep(0.1)


def run_command(command: list[str], log: Path, env: dict[str, str] | None = None) -> Outcome:
    """Run a command line (e.g. `python cli.py fit`, whose DDP launcher re-executes it per rank) in its own
    process group, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env={**trial_environ(), **(env or {})},
                                start_new_session=True)
        _CHILDREN.add(proc.pid)
        try:
            proc.wait()
        except BaseException:  # an interrupt while waiting: stop every rank
            _stop_and_wait(proc.pid, lambda seconds: _waited(proc, seconds))
            raise
        finally:
            _CHILDREN.discard(proc.pid)
            stopped = proc.pid in _STOPPED
            _STOPPED.discard(proc.pid)
    if proc.returncode == 0:
        return Outcome("ok")
    return outcome_of(None, proc.returncode, log, stopped)


def _waited(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _reason_from_log(log: Path, code: int | None) -> str:
    tail = log.read_text(errors="replace").strip().splitlines()[-30:] if log.exists() else []
    error_lines = [line for line in tail if "Error" in line or "error:" in line or "Exception" in line]
    return (error_lines[-1] if error_lines else f"exit code {code}")[:2000]


def outcome_of(result_file: Path | None, exitcode: int | None, log: Path, stopped: bool = False) -> Outcome:
    """How a trial process ended: its own result file if it wrote one; else a stop this process asked for
    (`stopped`: `stop_children`) or a death by a signal (negative exit code) is an interruption, anything
    else a failure with the log's last error line.

    Exit code 255 is multiprocessing's "status unknown": the forkserver that reports a child's status died
    first, as it does when SLURM signals every process of a job (`scancel`, preemption). The child's own
    "interrupted:" line then tells what happened.
    """
    if result_file is not None and result_file.exists():
        data = json.loads(result_file.read_text())
        return Outcome(data["status"], data.get("reason", ""))
    if stopped and exitcode != 0:
        return Outcome("interrupted", f"stopped on this worker's stop request (exit code {exitcode})")
    if exitcode in (130, 143, 129, 255) and log.exists() and "interrupted: " in log.read_text(errors="replace"):
        return Outcome("interrupted", f"stopped (exit code {exitcode})")
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        why = " (out of memory, or killed from outside)" if sig == 9 else ""
        return Outcome("interrupted", f"killed by signal {sig}{why}")
    return Outcome("failed", _reason_from_log(log, exitcode))
