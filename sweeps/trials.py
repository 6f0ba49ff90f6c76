"""A sweep trial is a fit config: the base config, the stage's overrides, the grid point, and where to write.

Trials train through `MedselCLI` exactly like `cli.py fit` (no second training loop); this module only
composes their configs (in the vocabulary of `sweeps.config`) and reads back what the run wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import yaml

from errors import ConfigError
from runs.files import TRAIN_EVAL, RunFiles
from sweeps.config import SweepConfig, candidate_name, fit_overrides, merge


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config '{path}': {e}") from None


def _apply(cfg: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Merge one override layer. A `pretrained_path` belongs to its network: a layer that names another
    network does not inherit it."""
    name = ((layer.get("model") or {}).get("network") or {}).get("name")
    current = (cfg.get("model") or {}).get("network") or {}
    if name is not None and name != current.get("name") and "pretrained_path" in current:
        cfg = merge(cfg, {})
        cfg["model"]["network"].pop("pretrained_path")
    return merge(cfg, layer)


class TrialConfigs:
    """The fit configs of a sweep's grid points. The base YAML is read once, here.

    Args:
        sweep: the sweep config.
    """

    def __init__(self, sweep: SweepConfig):
        self.sweep = sweep
        base = _apply(load_yaml(sweep.base_config), fit_overrides(sweep.overrides, "overrides"))
        # What every trial shares: base config + sweep overrides + stage-1 defaults.
        self.shared = _apply(base, fit_overrides(sweep.stage1.defaults, "stage1.defaults"))
        self.candidates = {candidate_name(c, f"stage1.candidates[{i}]"): (i, c)
                           for i, c in enumerate(sweep.stage1.candidates)}

    def candidate(self, name: str) -> dict[str, Any]:
        """The stage-1 config of one candidate (before the trial-specific run settings)."""
        i, cand = self.candidates[name]
        overrides = {k: v for k, v in cand.items() if k not in ("label", "overrides")}
        cfg = _apply(self.shared, fit_overrides(overrides, f"stage1.candidates[{i}]"))
        return _apply(cfg, fit_overrides(cand.get("overrides"), f"stage1.candidates[{i}].overrides"))

    def stage2(self, name: str, optimizer: str, loss: str) -> dict[str, Any]:
        """The stage-2 config of a grid point (optimizer x loss) on candidate `name`."""
        point = fit_overrides({"model.optimizer": optimizer, "model.loss": loss}, "stage2")
        cfg = _apply(self.candidate(name), point)
        return _apply(cfg, fit_overrides(self.sweep.stage2.overrides, "stage2.overrides"))


def finalize(
    cfg: dict[str, Any], sweep: SweepConfig, run_dir: Path, stage: str, seed: int, tags: list[str],
    pruning: dict[str, Any] | None,
) -> dict[str, Any]:
    """Add the trial's seed, run directory, W&B grouping, the per-epoch progress file and (optionally) the
    pruning callback."""
    run = {
        "name": f"{sweep.name}-{stage}", "dir": str(run_dir), "wandb_group": sweep.name, "wandb_job_type": stage,
        "wandb_tags": tags,
    }
    if sweep.wandb is not None:
        run["wandb"] = sweep.wandb
    out = merge(cfg, {"seed_everything": seed, "run": run})
    trainer = out.setdefault("trainer", {})
    trainer.setdefault("enable_progress_bar", False)
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    callbacks = [*callbacks, {"class_path": "sweeps.epoch_progress.EpochProgress"}]
    if pruning is not None:
        callbacks.append({"class_path": "sweeps.pruning.OptunaPruning", "init_args": pruning})
    trainer["callbacks"] = callbacks
    return out


def epoch_table(run_dir: Path) -> pl.DataFrame:
    """metrics.csv collapsed to one row per epoch (Lightning writes step and epoch rows separately)."""
    path = RunFiles(run_dir).metrics
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
    files = RunFiles(run_dir)
    table = epoch_table(run_dir)
    if "val/loss" in table.columns:
        table = table.filter(pl.col("val/loss").is_not_null())
    if table.is_empty() or "val/loss" not in table.columns:
        raise RuntimeError(f"run {run_dir} logged no validation epoch")
    if epoch == "best" and monitor in table.columns:
        row = table.sort(monitor, descending=(mode == "max"), nulls_last=True).row(0, named=True)
    else:
        row = table.row(-1, named=True)
    info = files.read_json(files.model_info.name) or {}
    metrics = {k: float(v) for k, v in row.items() if k != "epoch" and v is not None and "/" in k}
    metrics.update((files.read_json(TRAIN_EVAL) or {}).get("metrics", {}))  # eval-mode overfit (runs.train_eval)
    return {
        "metrics": metrics, "epoch": int(row["epoch"]), "epochs_run": int(table["epoch"].max()) + 1,
        "params": int(info.get("num_parameters", 0)), "checkpoint": str(files.best_checkpoint),
    }
