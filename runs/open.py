"""Reopening a finished run: from a run directory, a sweep folder (its winner) or a bare checkpoint.

Everything goes through the same LightningCLI parser as `cli.py fit`, so a reopened model and DataModule are
built exactly as in training; a bare `.ckpt` carries what that needs (the model's and the DataModule's
hyper-parameters: classes, channels, size, resize mode; normalisation follows from the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from errors import ConfigError
from runs import files
from runs.files import RunFiles

# Model arguments the parser links from `data.*`: given again they would be rejected as duplicates.
_LINKED = ("classes", "image_size", "in_chans", "resize")


@dataclass
class OpenedRun:
    """A trained run, ready to evaluate or predict.

    Attributes:
        checkpoint: the weights.
        run_dir: the run directory (None for a bare checkpoint outside one).
        config: the resolved config (the fit config of the run, or the checkpoint's hyper-parameters).
        cli: the parser-built CLI object (`cli.model`, `cli.datamodule`, `cli.trainer`).
    """

    checkpoint: Path
    run_dir: Path | None
    config: dict[str, Any]
    cli: Any

    @property
    def model(self):
        return self.cli.model

    @property
    def datamodule(self):
        return self.cli.datamodule

    @property
    def trainer(self):
        return self.cli.trainer


def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """`(checkpoint, run_dir)` for a sweep folder (its winner), a run directory or a `.ckpt` file.

    Raises:
        ConfigError: none of these; the message says what to pass.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".ckpt":
        parent = p.parent.parent if p.parent.name == files.CHECKPOINTS else None
        return p, parent if parent is not None and RunFiles(parent).config.exists() else None
    winner = files.winner_run_dir(p) if p.is_dir() else None
    if winner is not None:
        if RunFiles(winner).best_checkpoint.exists():
            return RunFiles(winner).best_checkpoint, winner
        if (p / files.WINNER_CKPT).exists():
            return p / files.WINNER_CKPT, None
    if files.is_run_dir(p):
        return RunFiles(p).best_checkpoint, p
    raise ConfigError(
        f"'{p}' is not a sweep folder ({files.WINNER}), a run directory ({files.CHECKPOINTS}/{files.BEST}.ckpt) or "
        "a .ckpt file. Train one first, e.g.: python cli.py sweep --config sweep_demo"
    )


def load_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded weights-only (never unpickling arbitrary objects).

    Raises:
        ConfigError: not a readable, weights-only checkpoint.
    """
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for unusable files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"'{checkpoint}' cannot be loaded as a weights-only checkpoint ({first}). Only checkpoints written by "
            "this tool (plain tensors and settings) are loaded; a file that needs arbitrary code to unpickle is "
            "refused on purpose."
        ) from None


def config_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A fit config rebuilt from a checkpoint's hyper-parameters (for a `.ckpt` without its run directory)."""
    model = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_") and k not in _LINKED}
    data = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    if not data:
        raise ConfigError("the checkpoint holds no data settings (not written by `cli.py fit`); open its run directory")
    return {"model": model, "data": data}


def _fit_call_arguments() -> list[str]:
    """Arguments LightningCLI's `fit` subcommand takes from `Trainer.fit` itself (e.g. ckpt_path, weights_only)."""
    import inspect

    from lightning.pytorch import Trainer

    return [k for k in inspect.signature(Trainer.fit).parameters if k not in ("self", "model", "train_dataloaders",
                                                                            "val_dataloaders", "datamodule")]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def open_run(path: str | Path, cli_class=None, overrides: dict[str, Any] | None = None) -> OpenedRun:
    """Rebuild a trained run's model (with its weights), DataModule and config through the fit parser.

    Args:
        path: a run directory, a sweep folder or a `.ckpt` file.
        cli_class: the LightningCLI class whose parser wrote the run's config (default `runs.cli.MedselCLI`).
        overrides: config values to change, e.g. {"data": {"num_workers": 0}}.

    Returns:
        The opened run; its model is in eval mode on the CPU.
    """
    from runs.cli import MedselCLI, run_dir_exported

    checkpoint, run_dir = find_checkpoint(path)
    ckpt = load_checkpoint(checkpoint)
    if run_dir is not None:
        config = yaml.safe_load(RunFiles(run_dir).config.read_text()) or {}
        for key in _fit_call_arguments():  # `fit` subcommand arguments (ckpt_path, ...), not part of the run's config
            config.pop(key, None)
    else:
        config = config_from_checkpoint(ckpt)
    quiet = {"trainer": {"logger": False, "devices": 1, "enable_progress_bar": False, "enable_model_summary": False},
             "model": {"network": {"pretrained": False, "pretrained_path": None}}}  # the checkpoint has every weight
    config = _merge(_merge(config, quiet), overrides or {})
    with run_dir_exported():  # nothing trains here: leave no run directory for a later run to inherit
        cli = (cli_class or MedselCLI)(args=config, run=False)
    cli.model.load_state_dict(ckpt["state_dict"])
    cli.model.eval()
    return OpenedRun(checkpoint, run_dir, config, cli)
