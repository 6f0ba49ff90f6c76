"""One W&B mode function for runs and sweeps: the value, else $WANDB_MODE, else offline; W&B's old names read."""

from __future__ import annotations

import pytest

from errors import ConfigError
from runs.wandb_mode import wandb_mode


def test_the_value_wins_then_the_environment_then_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "online" and wandb_mode(None) == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(None) == "offline"


def test_wandb_s_own_dryrun_is_offline_everywhere(monkeypatch):
    """Lightning's offline logger sets $WANDB_MODE=dryrun in its process; a sweep's summary run after it must
    read that as offline, as a run's report does."""
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(None) == "offline"


def test_an_unknown_mode_is_one_clear_error():
    with pytest.raises(ConfigError, match="must be offline, online or disabled, got 'sometimes'"):
        wandb_mode("sometimes")
