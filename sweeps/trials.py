"""A sweep trial is a fit config: the base config, the stage's settings, the grid point, and where to write.

Trials train through `MedselCLI` exactly like `cli.py fit` (no second training loop); this module only
composes their configs and reads back what the run wrote (metrics.csv, model.json, checkpoints).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from lightning_modules.optimizers import optimizer_config
from errors import ConfigError
from sweeps.config import Candidate, SweepConfig


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config '{path}': {e}") from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge. A `{class_path, init_args}` value naming another class replaces the old one whole,
    so e.g. Adam's `amsgrad` never leaks into RMSprop."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if "class_path" in value and old.get("class_path") != value["class_path"]:
                out[key] = copy.deepcopy(value)
            else:
                out[key] = merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _optimizer(spec: str | dict[str, Any], lr: float | None) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    return optimizer_config(spec, **({"lr": lr} if lr is not None else {}))


def _network(base: dict[str, Any], candidate: Candidate) -> dict[str, Any]:
    """The candidate's network on top of the base config's head settings (pool, hidden, dropout, freezing).

    A `pretrained_path` of the base belongs to the base's network and is not carried to other networks.
    """
    net = dict(base.get("model", {}).get("network", {}) or {})
    given = {"name": candidate.network} if isinstance(candidate.network, str) else dict(candidate.network)
    if given.get("name") != net.get("name"):
        net.pop("pretrained_path", None)
    return {**net, **given}


def base_trial_config(sweep: SweepConfig) -> dict[str, Any]:
    """Base fit config + sweep overrides + stage-1 defaults: what every trial shares."""
    cfg = merge(load_yaml(sweep.base_config), sweep.overrides)
    d = sweep.stage1.defaults
    shared: dict[str, Any] = {"model": {}, "data": {}, "trainer": {}}
    if d.optimizer is not None:
        shared["model"]["optimizer"] = _optimizer(d.optimizer, d.lr)
    if d.loss is not None:
        shared["model"]["loss"] = d.loss
    if d.batch_size is not None:
        shared["data"]["batch_size"] = d.batch_size
    if d.image_size is not None:
        shared["data"]["image_size"] = d.image_size
    if d.max_epochs is not None:
        shared["trainer"]["max_epochs"] = d.max_epochs
    return merge(cfg, shared)


def candidate_config(sweep: SweepConfig, candidate: Candidate) -> dict[str, Any]:
    """The stage-1 config of one candidate (before the trial-specific run settings)."""
    cfg = base_trial_config(sweep)
    cand: dict[str, Any] = {"model": {"network": _network(cfg, candidate)}}
    if candidate.image_size is not None:
        cand["data"] = {"image_size": candidate.image_size}
    return merge(merge(cfg, cand), candidate.overrides)


def stage2_config(sweep: SweepConfig, candidate: Candidate, optimizer: str, loss: str) -> dict[str, Any]:
    cfg = candidate_config(sweep, candidate)
    return merge(cfg, {"model": {"optimizer": _optimizer(optimizer, sweep.stage2.lr), "loss": loss}})


def finalize(
    cfg: dict[str, Any], sweep: SweepConfig, run_dir: Path, stage: str, seed: int, tags: list[str],
    pruning: dict[str, Any] | None,
) -> dict[str, Any]:
    """Add the trial's seed, run directory, W&B grouping and (optionally) the pruning callback."""
    run = {
        "name": f"{sweep.name}-{stage}", "dir": str(run_dir), "wandb_group": sweep.name, "wandb_job_type": stage,
        "wandb_tags": tags,
    }
    if sweep.wandb is not None:
        run["wandb"] = sweep.wandb
    out = merge(cfg, {"seed_everything": seed, "run": run})
    trainer = out.setdefault("trainer", {})
    trainer.setdefault("enable_progress_bar", False)
    if pruning is not None:
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        trainer["callbacks"] = [*callbacks, {"class_path": "sweeps.pruning.OptunaPruning", "init_args": pruning}]
    return out


def epoch_table(run_dir: Path) -> pl.DataFrame:
    """metrics.csv collapsed to one row per epoch (Lightning writes step and epoch rows separately)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return pl.DataFrame()
    frame = pl.read_csv(path, infer_schema_length=None)
    metrics = [c for c in frame.columns if c not in ("epoch", "step")]
    return frame.group_by("epoch", maintain_order=True).agg(
        [pl.col(c).drop_nulls().last() for c in metrics]
    ).sort("epoch")


def summarize(run_dir: Path, epoch: str, monitor: str, mode: str) -> dict[str, Any]:
    """The metrics a trial is judged by: those of its best-checkpoint epoch ("best") or its last epoch.

    Raises:
        RuntimeError: the run logged no validation epoch.
    """
    table = epoch_table(run_dir).filter(pl.col("val/loss").is_not_null()) if (run_dir / "metrics.csv").exists() else pl.DataFrame()
    if table.is_empty():
        raise RuntimeError(f"run {run_dir} logged no validation epoch")
    if epoch == "best" and monitor in table.columns:
        row = table.sort(monitor, descending=(mode == "max"), nulls_last=True).row(0, named=True)
    else:
        row = table.row(-1, named=True)
    info = json.loads((run_dir / "model.json").read_text()) if (run_dir / "model.json").exists() else {}
    metrics = {k: float(v) for k, v in row.items() if k != "epoch" and v is not None and "/" in k}
    return {
        "metrics": metrics, "epoch": int(row["epoch"]), "epochs_run": int(table["epoch"].max()) + 1,
        "params": int(info.get("num_parameters", 0)), "checkpoint": str(run_dir / "checkpoints" / "best.ckpt"),
    }
