"""SLURM launch settings, checked before anything is submitted, and their submitit executor.

The settings use the sweep's vocabulary (underscores, one key per sbatch option a user usually sets) and pass
anything else through `sbatch:` unchanged. submitit writes the sbatch script, signals the job `signal_delay_s`
before its time limit and requeues what a `checkpoint()` returns; nothing here writes an sbatch template by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from errors import ConfigError

# SLURM's --time formats: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes" and "days-hours:minutes:seconds".
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def time_minutes(value: str | int, key: str = "launcher.time") -> int:
    """Minutes of a SLURM `--time` value (rounded up), or ConfigError naming `key`."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{key}: {value} minutes; give a positive time such as 04:00:00 or 1-00:00:00.")
        return value
    match = _TIME.match(str(value).strip())
    if not match:
        raise ConfigError(f"{key}: '{value}' is not a SLURM time; use MM, HH:MM:SS, D-HH or D-HH:MM:SS "
                          "(e.g. 04:00:00).")
    d, a, b, c = (int(match[g]) if match[g] else None for g in "dabc")
    if d is not None:  # days-hours[:minutes[:seconds]]
        seconds = ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # hours:minutes:seconds
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # minutes:seconds
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"{key}: '{value}' is zero; give the time a worker may run, e.g. 04:00:00.")
    return -(-seconds // 60)


@dataclass(frozen=True)
class SlurmSettings:
    """How the sweep's workers are submitted: one SLURM job array of `workers` tasks.

    Args:
        workers: array tasks; each runs the sweep's worker loop against the shared storage.
        partition, account, qos: the usual sbatch options (None: the cluster's default).
        time: each worker's time limit, in SLURM's format (04:00:00, 1-00:00:00).
        gpus_per_worker: GPUs per task; a trial's `trainer.devices` must fit inside.
        cpus_per_worker: CPU cores per task (data loading runs on these).
        mem_gb: memory per task in GiB (None: the partition's default).
        array_parallelism: at most this many tasks of the array run at once (None: all).
        setup: shell lines run before the worker starts (`module load cuda/12.4`, `source venv/bin/activate`).
        signal_delay_s: seconds before the time limit at which the worker is signalled to requeue itself.
        sbatch: other sbatch options, passed through (`{constraint: a100, exclude: node12}`).
    """

    workers: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    gpus_per_worker: int = 0
    cpus_per_worker: int = 4
    mem_gb: float | None = None
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()
    signal_delay_s: int = 120
    sbatch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, key: str = "launcher") -> SlurmSettings:
        """Build and check settings from a config mapping; every mistake is a ConfigError naming its key."""
        values = dict(values or {})
        values.pop("kind", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}. Other sbatch options go "
                              f"under {key}.sbatch.")
        if isinstance(values.get("setup"), str):
            values["setup"] = [values["setup"]]
        values["setup"] = tuple(str(line) for line in values.get("setup") or ())
        settings = cls(**values)
        settings.validate(key)
        return settings

    def validate(self, key: str = "launcher") -> None:
        """Check the values themselves (no cluster needed)."""
        for name in ("workers", "cpus_per_worker"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{key}.{name}: {getattr(self, name)!r}; give a whole number >= 1.")
        for name in ("gpus_per_worker",):
            if not _positive_int(self.gpus_per_worker, allow_zero=True):
                raise ConfigError(f"{key}.{name}: {self.gpus_per_worker!r}; give a whole number >= 0.")
        if self.array_parallelism is not None and not _positive_int(self.array_parallelism):
            raise ConfigError(f"{key}.array_parallelism: {self.array_parallelism!r}; give a whole number >= 1 "
                              "or leave it unset.")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, int | float) and self.mem_gb > 0):
            raise ConfigError(f"{key}.mem_gb: {self.mem_gb!r}; give GiB per worker (> 0) or leave it unset.")
        if not isinstance(self.sbatch, dict):
            raise ConfigError(f"{key}.sbatch: give a mapping of sbatch options, e.g. {{constraint: a100}}.")
        minutes = time_minutes(self.time, f"{key}.time")
        if self.signal_delay_s >= minutes * 60:
            raise ConfigError(f"{key}.signal_delay_s: {self.signal_delay_s} s is not shorter than {key}.time "
                              f"({self.time}); the worker would be signalled before it starts.")

    def check_cluster(self, key: str = "launcher") -> None:
        """Fail fast on what only the cluster knows: sbatch present, the partition exists. Submits nothing."""
        if shutil.which("sbatch") is None:
            raise ConfigError("launcher slurm: 'sbatch' is not on PATH. Run the sweep on the cluster's login node "
                              "(where `sbatch --version` works), or drop --launcher slurm to run locally.")
        if self.partition is None:
            return
        out = _run(["sinfo", "-h", "-o", "%R"])
        partitions = sorted(set(out.split()))
        if self.partition not in partitions:
            raise ConfigError(f"{key}.partition: '{self.partition}' is not a partition of this cluster; "
                              f"available: {partitions} (sinfo).")

    def executor(self, folder: str | Path, cluster: str | None = None, name: str = "medsel-sweep"):
        """A submitit executor with these settings; `cluster` 'local'/'debug' runs them without SLURM (tests)."""
        import submitit  # the follower imports submitit only when it launches

        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": time_minutes(self.time),
            "cpus_per_task": self.cpus_per_worker,
            "tasks_per_node": 1,
            "nodes": 1,
            "slurm_signal_delay_s": self.signal_delay_s,
        }
        if self.gpus_per_worker:
            params["gpus_per_node"] = self.gpus_per_worker
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        optional = {"slurm_partition": self.partition, "slurm_account": self.account, "slurm_qos": self.qos,
                    "slurm_array_parallelism": self.array_parallelism}
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        if self.sbatch:
            params["slurm_additional_parameters"] = dict(self.sbatch)
        # AutoExecutor ignores the other clusters' prefixed keys, so one call serves slurm, local and debug.
        executor.update_parameters(**params)
        return executor


def _positive_int(value: Any, allow_zero: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise ConfigError(f"launcher slurm: `{' '.join(cmd)}` failed ({detail.strip()}); is the SLURM controller "
                          "reachable from this machine?") from None
