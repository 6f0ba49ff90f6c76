"""The jobs a sweep runs in isolated processes (fit a trial, test a run, check the configs), both sides:
the child-side functions, which import torch, and the coordinator-side calls, which never do."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from errors import ConfigError, SweepError
from runs import files
from runs.files import RunFiles
from sweeps import isolation
from sweeps.config import SweepConfig

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "lightning.pytorch", "timm", "torchmetrics", "albumentations", "polars", "wandb",
           "wandb.sdk.launch",  # imported lazily by every wandb.init (~1-2 s): import it once, here
           "evaluation.cli", "datamodules", "sweeps.jobs"]


def start_forkserver() -> None:
    """The forkserver every job forks from, importing torch, lightning and timm in the background now."""
    isolation.start_forkserver(PRELOAD)


def _run(target, payload: dict[str, Any], workdir: Path, name: str) -> isolation.Outcome:
    start_forkserver()
    return isolation.run_in_process(target, payload, workdir, name)


def _evaluation_cli():
    from datamodules.images import allow_large_scans

    allow_large_scans()
    from evaluation.cli import EvaluationCLI  # the CLI behind `cli.py fit/test`: the test writes the report

    return EvaluationCLI


def fit(payload: dict[str, Any]) -> None:
    """Child side: train one trial config, exactly as `cli.py fit --config` does; with the config's `ckpt_path`
    (an interrupted attempt's `checkpoints/last.ckpt`) the fit continues from it, or trains from scratch with a
    warning if it cannot be read (`runs.continuation`)."""
    from runs.continuation import resumable

    config = dict(payload["config"])
    ckpt_path = config.pop("ckpt_path", None)  # a `fit` argument, not part of the instantiated config
    cli = _evaluation_cli()(args=config, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resumable(ckpt_path, cli.run_dir))


def test(payload: dict[str, Any]) -> None:
    """Child side: test a finished run with its best checkpoint, exactly as `cli.py test --config` does."""
    _evaluation_cli()(args=["test", "--config", payload["config_path"], "--trainer.enable_progress_bar=false",
                            *payload.get("extra", [])])


def check(payload: dict[str, Any]) -> None:
    """Child side: a sweep's preflight (`sweeps.preflight.check`), away from the coordinator's light process."""
    from sweeps.preflight import check as check_sweep

    check_sweep(SweepConfig.from_dict(payload["sweep"]))


def devices(config: dict[str, Any]) -> int:
    """How many devices a fit config trains on (`trainer.devices`: a count, a list, or "auto" = 1)."""
    value = (config.get("trainer") or {}).get("devices", 1)
    return len(value) if isinstance(value, list) else value if isinstance(value, int) else 1


def execute(config: dict[str, Any], run_dir: Path) -> isolation.Outcome:
    """Train one trial config in its own process: forked for one device, `cli.py fit` for several (Lightning's
    DDP launcher re-executes that command per rank).

    The config is a `cli.py fit` config: `ckpt_path` continues a run from a checkpoint, `run.until_epoch`
    stops it after that many epochs (the schedule stays defined over `trainer.max_epochs`); a later call
    with `ckpt_path: <run_dir>/checkpoints/last.ckpt` and a larger `run.until_epoch` continues it."""
    if devices(config) > 1:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "trial_config.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return isolation.run_command([sys.executable, str(REPO / "cli.py"), "fit", "--config", str(cfg_path)],
                                     run_dir / "fit.log")
    return _run(fit, {"config": config}, run_dir, "fit")


def check_in_child(sweep: SweepConfig) -> None:
    """`sweeps.preflight.check` in a forked process, so this (coordinator) process never imports torch.
    Raises its ConfigError listing every problem."""
    outcome = _run(check, {"sweep": sweep.to_dict()}, sweep.out_dir, "check")
    if outcome.status != "ok":
        raise ConfigError(outcome.reason)


def evaluate_on_test(run_dir: Path) -> dict[str, Any]:
    """Evaluate a finished trial once on the test split (as `cli.py test` does); reuse an earlier result."""
    run = RunFiles(run_dir)
    if not run.test_metrics.exists():
        # One device: a single ordered pass over the test split. (A DDP launcher would also re-execute this
        # process's command line, which is the sweep's, not `cli.py test`.) The run directory as it is found
        # now, not as its config.yaml recorded it: a moved or copied sweep folder writes into itself.
        single = ["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.num_nodes=1", f"--run.dir={Path(run_dir).resolve()}"]
        outcome = _run(test, {"config_path": str(run.config), "extra": single}, run_dir, "test")
        if outcome.status != "ok":
            raise SweepError(f"testing the winner failed: {outcome.reason} (log: {run_dir / 'test.log'})")
    return run.read_json(files.TEST_METRICS)
