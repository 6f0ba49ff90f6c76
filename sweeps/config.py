"""Sweep configuration (`configs/sweep_*.yaml`), parsed by jsonargparse so misspelled keys are errors.

A sweep names a base fit config and what the two stages vary:

    name: fundus
    base_config: configs/fundus.yaml
    stage1:
      candidates: [{network: legacy_xception}, {network: resnet50}, {network: inception_v3, image_size: 160}]
      defaults: {optimizer: rmsprop, loss: ce, batch_size: 32, max_epochs: 15, image_size: 128}
    stage2: {optimizers: [rmsprop, adam, adagrad], losses: [ce, mse, mae]}
    selection: {rule: rank_score}
    repeats: 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from errors import ConfigError


@dataclass
class Candidate:
    """One stage-1 architecture.

    Attributes:
        network: a network name (timm or custom), or a mapping of `model.network` fields.
        label: name in leaderboards (default: the network name).
        image_size: input size for this candidate where it differs from the stage default.
        overrides: any other fit-config keys for this candidate, e.g. {data: {batch_size: 16}}.
    """

    network: str | dict
    label: str | None = None
    image_size: int | list[int] | None = None
    overrides: dict = field(default_factory=dict)  # plain dict: jsonargparse keeps {class_path: ...} raw

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return self.network if isinstance(self.network, str) else str(self.network.get("name"))


@dataclass
class StageDefaults:
    """Settings every stage-1 trial shares (study 002, 2.4.1); None keeps the base config's value.

    Attributes:
        optimizer: optimizer preset name (rmsprop, adam, adagrad, adamw, sgd) or {class_path, init_args}.
        lr: learning rate for the optimizer preset (None: the preset's Keras default).
        loss: loss name.
        batch_size: batch size.
        max_epochs: epochs per trial.
        image_size: input size (candidates may override).
    """

    optimizer: str | dict | None = "rmsprop"
    lr: float | None = None
    loss: str | None = "ce"
    batch_size: int | None = 32
    max_epochs: int | None = 15
    image_size: int | list[int] | None = 128


@dataclass
class Stage1:
    candidates: list[Candidate] = field(default_factory=list)
    defaults: StageDefaults = field(default_factory=StageDefaults)


@dataclass
class Stage2:
    """The optimizer x loss grid trained on the stage-1 winner (study 002, 2.4.4).

    Attributes:
        optimizers: optimizer preset names.
        losses: loss names.
        lr: learning rate for every optimizer (None: each preset's default).
    """

    optimizers: list[str] = field(default_factory=lambda: ["rmsprop", "adam", "adagrad"])
    losses: list[str] = field(default_factory=lambda: ["ce", "mse", "mae"])
    lr: float | None = None


@dataclass
class RankTerm:
    """One term of study 002's overall score: weight * (N + 1 - rank) if higher is better, else weight * rank."""

    metric: str
    weight: float
    higher_is_better: bool


def study002_terms() -> list[RankTerm]:
    """Section 2.4.2: 3 * overfit rank + 2 * (N+1 - accuracy rank) + 1.5 * loss rank
    + 1 * (N+1 - sensitivity rank) + 0.25 * (N+1 - specificity rank)."""
    return [
        RankTerm("val/overfit", 3.0, False),
        RankTerm("val/acc", 2.0, True),
        RankTerm("val/loss", 1.5, False),
        RankTerm("val/sensitivity", 1.0, True),
        RankTerm("val/specificity", 0.25, True),
    ]


@dataclass
class Selection:
    """How a stage's winner is chosen.

    Attributes:
        rule: "rank_score" (study 002's overall score over the stage's finished trials) or "metric".
        terms: the rank-score terms and weights (default: the paper's).
        metric: for rule "metric": any logged key, e.g. val/mcc, val/auroc, val/loss.
        direction: for rule "metric": maximize or minimize.
        epoch: which epoch's metrics a trial is judged by: "best" (its best checkpoint) or "last".
        loss_term: what the rank score's `val/loss` term ranks. "auto": `val/nll` (cross-entropy of the
            predicted probabilities, comparable across losses) when the stage's grid varies the loss, the
            trained loss otherwise; "trained": always each trial's own loss (the paper's literal rule, which
            favours losses with small values such as MSE); "nll": always `val/nll`.
        overfit: what the `val/overfit` term ranks. "eval": training accuracy measured in eval mode (no
            augmentation, no dropout) at the best checkpoint minus validation accuracy there, from one extra
            pass over the training split per trial; "running": the running training-mode accuracy of the
            epoch minus validation accuracy (the paper's).
        allow_incomplete: let a grid point win although some of its repeats failed, were pruned or are
            missing (its mean is then over fewer seeds than the others').
    """

    rule: Literal["rank_score", "metric"] = "rank_score"
    terms: list[RankTerm] = field(default_factory=study002_terms)
    metric: str = "val/acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    epoch: Literal["best", "last"] = "best"
    loss_term: Literal["auto", "trained", "nll"] = "auto"
    overfit: Literal["eval", "running"] = "eval"
    allow_incomplete: bool = False


@dataclass
class SweepConfig:
    """A two-stage model-selection sweep.

    Attributes:
        name: the sweep's name; outputs go to `<root>/<name>/`.
        base_config: the fit config every trial starts from.
        overrides: fit-config keys applied to every trial (e.g. {trainer: {max_epochs: 5}}).
        stage1: candidate architectures and their shared defaults.
        stage2: optimizer x loss grid.
        selection: the winner rule.
        repeats: seeds per grid point; leaderboards then show mean +- 95% interval and wins.
        seed: seed of the first repeat (repeat r uses seed + r).
        storage: Optuna storage URL; default sqlite:///<root>/<name>/optuna.db. Point every machine at the
            same postgresql://... URL to spread a sweep over machines.
        root: folder of all sweeps.
        workers: parallel worker processes on this machine (each pinned to its own GPUs when there are GPUs).
        pruner: "none", "median" or "hyperband": stop hopeless trials early within a stage.
        retry_failed: retry trials that failed with an error (interrupted trials are always retried).
        heartbeat_seconds: how often a running trial proves it is alive; a trial silent for 6x this long
            (from another machine) is considered interrupted and retried.
        test_winner: evaluate the winner once on the untouched test split.
        wandb: W&B mode for every trial (None: $WANDB_MODE, else offline).
    """

    name: str
    base_config: str
    overrides: dict = field(default_factory=dict)
    stage1: Stage1 = field(default_factory=Stage1)
    stage2: Stage2 = field(default_factory=Stage2)
    selection: Selection = field(default_factory=Selection)
    repeats: int = 1
    seed: int = 42
    storage: str | None = None
    root: str = "artifacts/sweeps"
    workers: int = 1
    pruner: Literal["none", "median", "hyperband"] = "none"
    retry_failed: bool = False
    heartbeat_seconds: float = 10.0
    test_winner: bool = True
    wandb: Literal["offline", "online", "disabled"] | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.out_dir / 'optuna.db').resolve()}"

    def validate(self) -> None:
        """Refuse sweeps that cannot produce a winner, naming the key to fix."""
        from lightning_modules.losses import LOSSES
        from lightning_modules.optimizers import OPTIMIZERS

        if not Path(self.base_config).is_file():
            raise ConfigError(f"sweep base_config '{self.base_config}' does not exist")
        if not self.stage1.candidates:
            raise ConfigError("sweep stage1.candidates is empty: list at least one network")
        names = [c.name for c in self.stage1.candidates]
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep stage1.candidates: duplicate labels {names}; give each a distinct `label`")
        for name in self.stage2.optimizers:
            OPTIMIZERS.get(name)
        for name in self.stage2.losses:
            LOSSES.get(name)
        if isinstance(self.stage1.defaults.optimizer, str):
            OPTIMIZERS.get(self.stage1.defaults.optimizer)
        if self.repeats < 1:
            raise ConfigError("sweep repeats must be >= 1")
        if self.workers < 1:
            raise ConfigError("sweep workers must be >= 1")
        if not self.stage2.optimizers or not self.stage2.losses:
            raise ConfigError("sweep stage2 needs at least one optimizer and one loss")
