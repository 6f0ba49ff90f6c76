"""The W&B mode of a run or sweep, decided in one place (and without importing wandb, torch or Lightning)."""

from __future__ import annotations

import os

from errors import ConfigError

MODES = ("offline", "online", "disabled")
# W&B's older names for its modes. Lightning's WandbLogger sets $WANDB_MODE=dryrun in its own process when
# it logs offline, so a later step of the same process (the report after `test`) reads that name back.
_ALIASES = {"dryrun": "offline", "run": "online"}


def wandb_mode(value: str | None = None) -> str:
    """`value` (run.wandb, a sweep's `wandb`), else $WANDB_MODE, else "offline": one of `MODES`.

    Raises:
        ConfigError: any other mode.
    """
    mode = value or os.environ.get("WANDB_MODE", "offline")
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ConfigError(f"run.wandb / $WANDB_MODE must be offline, online or disabled, got {mode!r}")
    return mode
