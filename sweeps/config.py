"""Sweep configuration (`configs/sweep_*.yaml`) and the sweep's vocabulary.

A sweep names a base fit config and what the two stages vary. Everything a stage sets is written as fit
overrides: the dotted keys of `cli.py fit` (`model.optimizer`, `data.image_size`, `trainer.max_epochs`, ...,
or nested mappings such as `{model: {loss: ce}}`), or one of the short aliases in `ALIASES`:

    name: fundus
    base_config: configs/fundus.yaml
    stage1:
      candidates:                      # each one: fit overrides (+ an optional `label`)
        - network: legacy_xception
        - {network: inception_v3, data.image_size: 160}
      defaults: {optimizer: rmsprop, loss: ce, data.batch_size: 32}   # default: STUDY002_DEFAULTS
    stage2: {optimizers: [rmsprop, adam, adagrad], losses: [ce, mse, mae], overrides: {lr: 1.0e-4}}
    selection: {rule: rank_score}
    repeats: 1

Every trial's config is then parsed by the fit parser (`runs.cli.MedselCLI`) before the first trial trains
(`sweeps.preflight`), so a misspelled key fails the sweep up front.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from errors import ConfigError

# The short spellings a sweep may use for the fit keys it varies most; every other key is written dotted.
ALIASES: dict[str, str] = {
    "network": "model.network",       # a network name, or a mapping of model.network fields
    "optimizer": "model.optimizer",   # a preset name (rmsprop, adam, adagrad, adamw, sgd) or {class_path, init_args}
    "lr": "model.optimizer.init_args.lr",
    "loss": "model.loss",
    "image_size": "data.image_size",
    "batch_size": "data.batch_size",
    "max_epochs": "trainer.max_epochs",
}
FIT_SECTIONS = ("model", "data", "trainer", "run", "report", "seed_everything", "ckpt_path")

# Study 002, section 2.4.1: the settings every stage-1 trial shares unless the sweep says otherwise.
STUDY002_DEFAULTS: dict[str, Any] = {
    "model.optimizer": "rmsprop", "model.loss": "ce", "data.batch_size": 32, "trainer.max_epochs": 15,
    "data.image_size": 128,
}


def _value(key: str, value: Any) -> Any:
    """Sweep shorthands for values: a network by name, an optimizer by preset name."""
    if key == "model.network" and isinstance(value, str):
        return {"name": value}
    if key == "model.optimizer" and isinstance(value, str):
        from lightning_modules.optimizers import optimizer_config

        return optimizer_config(value)
    return value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge. A `{class_path, init_args}` value naming another class replaces the old one whole,
    so e.g. Adam's `amsgrad` never leaks into RMSprop."""
    out = copy.deepcopy(dict(base))
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


def fit_overrides(values: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Sweep overrides (aliases, dotted keys or nested mappings) as one nested fit-config mapping.

    An `lr` applies to the optimizer named in the same mapping, whatever the order of the keys.

    Example:
        >>> fit_overrides({"image_size": 64, "trainer.max_epochs": 2}, "x")
        {'data': {'image_size': 64}, 'trainer': {'max_epochs': 2}}

    Raises:
        ConfigError: a key that is neither an alias nor a fit key, naming `where`.
    """
    out: dict[str, Any] = {}
    items = sorted((values or {}).items(), key=lambda kv: kv[0] == "lr")
    for key, value in items:
        full = ALIASES.get(key, key)
        if full.split(".")[0] not in FIT_SECTIONS:
            raise ConfigError(
                f"{where}: unknown key '{key}'. Write fit keys dotted ({', '.join(s + '.*' for s in FIT_SECTIONS[:5])}) "
                f"or use an alias: {', '.join(ALIASES)}."
            )
        out = merge(out, _nest(full, _value(full, value)))
    return out


def candidate_name(candidate: Mapping[str, Any], where: str = "stage1.candidates") -> str:
    """A candidate's leaderboard name: its `label`, else its network's name."""
    if candidate.get("label"):
        return str(candidate["label"])
    cfg = merge(fit_overrides({k: v for k, v in candidate.items() if k not in ("label", "overrides")}, where),
                fit_overrides(candidate.get("overrides"), f"{where}.overrides"))
    network = cfg.get("model", {}).get("network")
    if not network or not network.get("name"):
        raise ConfigError(f"{where}: every candidate needs a `network` (a name or a mapping with `name`)")
    return str(network["name"])


@dataclass
class Schedule:
    """How a stage spends its epochs (`sweeps.schedule`).

    Attributes:
        kind: "exhaustive" (every run trains `max_epochs`) or "successive_halving": every candidate trains
            `min_epochs`, the best 1/`eta` by the stage's selection rule (fold means under CV) go on to
            `min_epochs * eta` epochs, and so on up to the trials' `max_epochs`.
        min_epochs: epochs of the first rung (None: chosen by the budget, else max_epochs / eta^2, at least 1).
        eta: the promotion factor (keep 1/eta of the candidates per rung; >= 2).
    """

    kind: Literal["exhaustive", "successive_halving"] = "exhaustive"
    min_epochs: int | None = None
    eta: int = 3


@dataclass
class Stage1:
    """The candidate architectures (study 002, 2.4.1).

    Attributes:
        candidates: one mapping of fit overrides per candidate (`network` is required), plus an optional
            `label` (its leaderboard name; default: the network name).
        defaults: fit overrides every stage-1 (and so stage-2) trial shares; None keeps the base config's
            value. Default: study 002's settings.
    """

    candidates: list[dict] = field(default_factory=list)  # plain dicts: jsonargparse keeps {class_path: ...} raw
    defaults: dict = field(default_factory=lambda: dict(STUDY002_DEFAULTS))
    schedule: Schedule = field(default_factory=Schedule)


@dataclass
class Stage2:
    """The optimizer x loss grid trained on the stage-1 winner (study 002, 2.4.4).

    Attributes:
        optimizers: optimizer preset names (each sets `model.optimizer`).
        losses: loss names (each sets `model.loss`).
        overrides: fit overrides for every stage-2 trial, applied after the grid point (e.g. {lr: 1.0e-4}).
    """

    optimizers: list[str] = field(default_factory=lambda: ["rmsprop", "adam", "adagrad"])
    losses: list[str] = field(default_factory=lambda: ["ce", "mse", "mae"])
    overrides: dict = field(default_factory=dict)
    schedule: Schedule = field(default_factory=Schedule)


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
class FoldStopping:
    """Early stopping across folds (`sweeps.fold_stopping`): folds run breadth-first, and a candidate whose
    paired comparison with the current best, on at least `min_folds` folds both finished, says it is worse
    with one-sided p < `alpha` stops its remaining folds (it cannot win).

    Attributes:
        enabled: stop clearly worse candidates early.
        min_folds: paired folds needed before a candidate may be stopped (>= 2).
        test: "corrected_t" (Nadeau & Bengio's corrected resampled t-test, one-sided) or "wilcoxon" (exact
            one-sided signed-rank; its smallest p on n folds is 1/2^n, so it cannot stop below
            log2(1/alpha) folds).
        alpha: the one-sided p-value below which a candidate stops.
    """

    enabled: bool = False
    min_folds: int = 2
    test: Literal["corrected_t", "wilcoxon"] = "corrected_t"
    alpha: float = 0.05


@dataclass
class Budget:
    """A time budget for the whole sweep (`sweeps.budget`).

    Attributes:
        hours: device-hours the sweep may spend training (the sum of its trials' times: wall clock with one
            worker); None: no budget.
        epoch_seconds: the expected seconds of one epoch of one run, for the plan before any trial ran
            (None: measured from this sweep's finished trials, else from its first trial).
    """

    hours: float | None = None
    epoch_seconds: float | None = None


@dataclass
class CrossValidation:
    """k-fold cross-validated selection.

    Attributes:
        folds: 0 (off: one train/val split) or k >= 2. The test split is held out once; the other images
            are cut into k stratified, patient-grouped folds (`data.split.folds`), and every grid point
            trains k times, validating on each fold in turn. Leaderboards show fold means with 95%
            intervals, the rank score ranks fold means, and each grid point's out-of-fold validation
            probabilities go to `<sweep>/oof/<stage>/<point>.parquet`.
        final: what is tested once on the test split. "refit": the winning configuration trained again on
            every non-test image for the median of its folds' best epochs; "ensemble": its k fold models,
            their test probabilities averaged.
    """

    folds: int = 0
    final: Literal["refit", "ensemble"] = "refit"
    early_stop: FoldStopping = field(default_factory=lambda: FoldStopping())

    @property
    def enabled(self) -> bool:
        return self.folds >= 2

    @property
    def k(self) -> int:
        """The number of folds a grid point trains on: 0 without cross-validation (one train/val split)."""
        return self.folds if self.enabled else 0


@dataclass
class Launcher:
    """Where the sweep's workers run: "local" (this machine, `workers` processes) or "slurm" (a job array).

    The SLURM keys are those of `cluster.slurm.SlurmSettings` (checked there, each error naming its key):
    `workers` array tasks, `partition`, `account`, `qos`, `time`, `gpus_per_worker`, `cpus_per_worker`,
    `mem_gb`, `array_parallelism`, `setup` (shell lines run before each worker: `module load cuda/12.4`,
    `source /shared/venv/bin/activate`), `signal_delay_s`, and `sbatch` for any other sbatch option.
    """

    kind: Literal["local", "slurm"] = "local"
    workers: int = 2
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    gpus_per_worker: int = 0
    cpus_per_worker: int = 4
    mem_gb: float | None = None
    array_parallelism: int | None = None
    setup: list[str] | str = field(default_factory=list)
    signal_delay_s: int = 120
    sbatch: dict = field(default_factory=dict)

    def slurm(self):
        """The checked `SlurmSettings` (ConfigError naming the `launcher.*` key at fault)."""
        from cluster.slurm import SlurmSettings

        return SlurmSettings.from_dict({f.name: getattr(self, f.name) for f in fields(self) if f.name != "kind"})


@dataclass
class SweepConfig:
    """A two-stage model-selection sweep.

    Attributes:
        name: the sweep's name; outputs go to `<root>/<name>/`.
        base_config: the fit config every trial starts from.
        overrides: fit overrides applied to every trial, before the stages' (e.g. {trainer.max_epochs: 5}).
        stage1: candidate architectures and their shared defaults.
        stage2: optimizer x loss grid.
        selection: the winner rule.
        repeats: seeds per grid point; leaderboards then show mean +- 95% interval and wins.
        cv: k-fold cross-validated selection (`cv: {folds: 5}`); off by default.
        seed: seed of the first repeat (repeat r uses seed + r).
        storage: Optuna storage URL; default sqlite:///<root>/<name>/optuna.db. Point every machine at the
            same postgresql://... URL to spread a sweep over machines.
        root: folder of all sweeps.
        workers: parallel worker processes on this machine (each pinned to its own GPUs when there are GPUs).
        pruner: "none", "median" or "hyperband": stop hopeless trials early within a stage.
        retry_failed: retry trials that failed with an error (interrupted trials are always retried).
        allow_failures: go on (and exit 0) although some grid points have no finished trial; by default the
            sweep stops after such a stage with exit code 1 and lists them.
        heartbeat_seconds: how often a running trial proves it is alive; a trial silent for 6x this long
            (from another machine) is considered interrupted and retried.
        test_winner: evaluate the winner once on the untouched test split.
        wandb: W&B mode for every trial (None: $WANDB_MODE, else offline).
        launcher: where the workers run; `--launcher slurm` submits them as a SLURM job array (docs/clusters.md).
        budget: device-hours the sweep may spend (`budget: {hours: 2}`): the plan is fitted to it or refused,
            and a stage that runs out finishes with its best point so far, marked budget-limited.
    """

    name: str
    base_config: str
    overrides: dict = field(default_factory=dict)
    stage1: Stage1 = field(default_factory=Stage1)
    stage2: Stage2 = field(default_factory=Stage2)
    selection: Selection = field(default_factory=Selection)
    repeats: int = 1
    cv: CrossValidation = field(default_factory=CrossValidation)
    seed: int = 42
    storage: str | None = None
    root: str = "artifacts/sweeps"
    workers: int = 1
    pruner: Literal["none", "median", "hyperband"] = "none"
    retry_failed: bool = False
    allow_failures: bool = False
    heartbeat_seconds: float = 10.0
    test_winner: bool = True
    wandb: Literal["offline", "online", "disabled"] | None = None
    launcher: Launcher = field(default_factory=Launcher)
    budget: Budget = field(default_factory=Budget)

    @property
    def out_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.out_dir / 'optuna.db').resolve()}"

    def problems(self) -> list[str]:
        """Everything in the sweep config itself that cannot work, each naming the key to fix (before
        anything is built; `sweeps.preflight` then checks every trial's fit config)."""
        from lightning_modules.optimizers import OPTIMIZERS  # no torch import: the coordinator stays light

        found = []
        if not Path(self.base_config).is_file():
            from runs import config_names

            found.append(f"sweep base_config '{self.base_config}' does not exist (project configs: "
                         f"{', '.join(n for n in config_names.available() if not n.startswith('sweep_'))})")
        if not self.stage1.candidates:
            found.append("sweep stage1.candidates is empty: list at least one network")
        names = []
        for i, candidate in enumerate(self.stage1.candidates):
            try:
                names.append(candidate_name(candidate, f"stage1.candidates[{i}]"))
            except ConfigError as e:
                found.append(str(e))
        if len(set(names)) != len(names):
            found.append(f"sweep stage1.candidates: duplicate labels {names}; give each a distinct `label`")
        for name in self.stage2.optimizers:  # loss names are checked on each parsed trial config (preflight)
            try:
                OPTIMIZERS.get(name)
            except ConfigError as e:
                found.append(f"stage2: {e}")
        if not self.stage2.optimizers or not self.stage2.losses:
            found.append("sweep stage2 needs at least one optimizer and one loss")
        if self.repeats < 1:
            found.append("sweep repeats must be >= 1")
        if self.cv.folds == 1 or self.cv.folds < 0:
            found.append(f"sweep cv.folds must be 0 (off) or at least 2, got {self.cv.folds}")
        if self.cv.final not in ("refit", "ensemble"):
            found.append(f"sweep cv.final must be refit or ensemble, got {self.cv.final!r}")
        if self.workers < 1:
            found.append("sweep workers must be >= 1")
        return found + self._budget_problems()

    def _budget_problems(self) -> list[str]:
        """The schedule, fold-stopping and budget keys, each problem naming its key and what to write."""
        found = []
        for where, sched in (("stage1.schedule", self.stage1.schedule), ("stage2.schedule", self.stage2.schedule)):
            if sched.kind not in ("exhaustive", "successive_halving"):
                found.append(f"sweep {where}.kind must be exhaustive or successive_halving, got {sched.kind!r}")
            if sched.eta < 2:
                found.append(f"sweep {where}.eta must be >= 2 (keep 1/eta of the candidates per rung), got {sched.eta}")
            if sched.min_epochs is not None and sched.min_epochs < 1:
                found.append(f"sweep {where}.min_epochs must be >= 1 (or null to let the sweep choose), got {sched.min_epochs}")
        stop = self.cv.early_stop
        if stop.enabled and not self.cv.enabled:
            found.append("sweep cv.early_stop.enabled needs cross-validation: set cv.folds to 2 or more, or disable it")
        if stop.min_folds < 2:
            found.append(f"sweep cv.early_stop.min_folds must be >= 2 (a paired test needs 2 folds), got {stop.min_folds}")
        if not 0 < stop.alpha < 1:
            found.append(f"sweep cv.early_stop.alpha must be between 0 and 1 (e.g. 0.05), got {stop.alpha}")
        if stop.test not in ("corrected_t", "wilcoxon"):
            found.append(f"sweep cv.early_stop.test must be corrected_t or wilcoxon, got {stop.test!r}")
        if self.budget.hours is not None and self.budget.hours <= 0:
            found.append(f"sweep budget.hours must be > 0 (or null for no budget), got {self.budget.hours}")
        if self.budget.epoch_seconds is not None and self.budget.epoch_seconds <= 0:
            found.append(f"sweep budget.epoch_seconds must be > 0 (or null to measure it), got {self.budget.epoch_seconds}")
        return found

    @classmethod
    def parser(cls, description: str = ""):
        """The `cli.py sweep` parser: `--config` plus every field of the sweep config as an option."""
        from jsonargparse import ActionConfigFile, ArgumentParser

        parser = ArgumentParser(prog="cli.py sweep", description=description, exit_on_error=True)
        parser.add_argument("--config", action=ActionConfigFile, help="sweep config YAML")
        parser.add_class_arguments(cls, None)
        return parser

    @classmethod
    def from_args(cls, argv: list[str], description: str = "") -> SweepConfig:
        """The sweep config of a `cli.py sweep` command line (`--config` and any `--key value`)."""
        parser = cls.parser(description)
        return cls._build(parser, parser.parse_args(argv))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepConfig:
        """Rebuild a sweep config from its `to_dict` form (in a worker or trial process)."""
        parser = cls.parser()
        return cls._build(parser, parser.parse_object(dict(values)))

    def to_dict(self) -> dict[str, Any]:
        """Plain mappings, lists and scalars: what sweep.yaml records and `from_dict` reads back."""
        return asdict(self)

    @classmethod
    def _build(cls, parser, namespace) -> SweepConfig:
        sections = ("stage1", "stage2", "selection", "cv", "budget")
        for name in sections:  # a section with nested sections instantiates a plain value silently as its defaults
            value = namespace.get(name)
            if value is not None and not hasattr(value, "items") and not hasattr(value, "__dict__"):
                raise ConfigError(f"sweep config: `{name}: {value}` must be a mapping, e.g. `cv: {{folds: 5}}`, "
                                  "`budget: {hours: 2}`, `selection: {rule: metric, metric: val/mcc}`.")
        try:
            init = parser.instantiate(namespace) if hasattr(parser, "instantiate") else parser.instantiate_classes(namespace)
        except TypeError as e:  # e.g. `cv: 3`: a section given as a plain value reaches its dataclass as **3
            sections = ", ".join(f.name for f in fields(cls) if f.name in ("stage1", "stage2", "selection", "cv", "launcher"))
            raise ConfigError(f"sweep config: {e}. The sections {sections} are mappings, e.g. `cv: {{folds: 5}}`, "
                              "`selection: {rule: metric, metric: val/mcc}`.") from None
        return cls(**{f.name: getattr(init, f.name) for f in fields(cls)})

    def validate(self) -> None:
        """Raise one ConfigError listing every problem of `problems()`."""
        found = self.problems()
        if found:
            raise ConfigError(problem_list(found))


def problem_list(problems: list[str]) -> str:
    """One message for several problems: the count, then one line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the sweep config; nothing was trained:\n  - " + "\n  - ".join(problems)
