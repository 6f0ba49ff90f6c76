"""Named optimizer and LR-scheduler presets.

The LightningModule takes an `OptimizerCallable` (any `torch.optim` class with its arguments, from YAML as
`class_path`/`init_args`). These presets give the short names a sweep grid uses ("rmsprop", "adam",
"adagrad") their study defaults — the Keras defaults the studies ran with, not PyTorch's where they differ.

Example:
    >>> optimizer_config("rmsprop")["class_path"]
    'torch.optim.RMSprop'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_modules.registry import Registry

if TYPE_CHECKING:  # torch itself is imported when a preset is resolved: the sweep coordinator never needs it
    import torch


@dataclass(frozen=True)
class Preset:
    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The `{class_path, init_args}` mapping LightningCLI/jsonargparse understands."""
        return {"class_path": self.class_path, "init_args": {**self.init_args, **overrides}}

    def resolve(self) -> type:
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)


OPTIMIZERS: Registry[Preset] = Registry("optimizer", "optimizer name")
OPTIMIZERS.add("adam", Preset("torch.optim.Adam", {"lr": 1e-3}))
OPTIMIZERS.add("adamw", Preset("torch.optim.AdamW", {"lr": 1e-3, "weight_decay": 1e-2}))
# Keras RMSprop: rho=0.9, epsilon=1e-7 (PyTorch defaults alpha=0.99, eps=1e-8).
OPTIMIZERS.add("rmsprop", Preset("torch.optim.RMSprop", {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7}))
# Keras Adagrad: learning_rate=1e-3, initial_accumulator_value=0.1 (PyTorch: lr=1e-2, 0).
OPTIMIZERS.add("adagrad", Preset("torch.optim.Adagrad", {"lr": 1e-3, "initial_accumulator_value": 0.1, "eps": 1e-7}))
OPTIMIZERS.add("sgd", Preset("torch.optim.SGD", {"lr": 1e-2, "momentum": 0.9}))

SCHEDULERS: Registry[Preset] = Registry("LR scheduler", "scheduler name")
SCHEDULERS.add("cosine", Preset("torch.optim.lr_scheduler.CosineAnnealingLR", {"T_max": 15}))
SCHEDULERS.add("plateau", Preset("torch.optim.lr_scheduler.ReduceLROnPlateau", {"mode": "min", "factor": 0.1, "patience": 3}))
SCHEDULERS.add("step", Preset("torch.optim.lr_scheduler.StepLR", {"step_size": 10, "gamma": 0.1}))


def optimizer_config(name: str, **overrides: Any) -> dict[str, Any]:
    """`{class_path, init_args}` for a named optimizer preset, with overrides (e.g. lr=1e-4)."""
    return OPTIMIZERS.get(name).config(**overrides)


def build_optimizer(name: str, params, **overrides: Any) -> torch.optim.Optimizer:
    preset = OPTIMIZERS.get(name)
    return preset.resolve()(params, **{**preset.init_args, **overrides})


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, **overrides: Any):
    preset = SCHEDULERS.get(name)
    return preset.resolve()(optimizer, **{**preset.init_args, **overrides})
