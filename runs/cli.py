"""`MedselCLI`: the LightningCLI behind `cli.py fit/validate/test/predict` and every sweep trial.

Besides LightningCLI's config handling it gives each run its own directory (`artifacts/runs/<name>/<version>`)
with the resolved config, split reference, best/last checkpoints, CSV metrics and an offline W&B run, and
lets `test`/`validate`/`predict` reuse a finished run by passing its saved config.yaml.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

from datamodules import ImageDataModule
from errors import ConfigError
from lightning_modules.classifier import ImageClassifier
from runs import files
from runs.callbacks import FitTimer, ModelInfoWriter, PredictionWriter, TestResultsWriter
from runs.continuation import ContinuableCSVLogger, Continuation, check_checkpoint, check_until_epoch
from runs.files import RunFiles
from runs.train_eval import TrainEvalWriter
from runs.wandb_mode import wandb_mode

_RUN_DIR_ENV = "MEDSEL_RUN_DIR"
_RUN_DIR_OWNER_ENV = "MEDSEL_RUN_DIR_OWNER_PID"


@dataclass
class RunConfig:
    """Where a run goes and how it is tracked.

    Attributes:
        name: experiment name; runs go to `<root>/<name>/<date-time-id>`.
        root: folder of all runs.
        dir: this run's folder. Set automatically and saved in the run's config.yaml, so passing that file
            to `test`/`validate`/`predict` reuses the run (and its best checkpoint).
        monitor: metric that picks the best checkpoint (any logged key, e.g. val/loss, val/mcc); None keeps
            the last epoch (set automatically when there is no validation split, `data.split.fold: all`).
        mode: "min" or "max" for `monitor`.
        early_stopping_patience: stop after this many epochs without improvement of `monitor` (None: off).
        until_epoch: stop once this many epochs are done, with the LR schedule and early-stopping patience still
            defined over `trainer.max_epochs` (None: train to `max_epochs`). Continue the run later with
            `--ckpt_path <run>/checkpoints/last.ckpt` and a larger `until_epoch` (`runs.continuation`).
        wandb: "offline" (sync later with `wandb sync`), "online", or "disabled". Default: $WANDB_MODE if set,
            else offline — a run never asks for a W&B login.
        wandb_project: W&B project.
        wandb_group: W&B group (a sweep sets its name).
        wandb_job_type: W&B job type (a sweep sets stage1/stage2).
        wandb_tags: W&B tags.
        config_file: the config file the run started from (set by `cli.py`; a config given by name is
            recorded as the project file it resolved to, e.g. configs/chd.yaml).
    """

    name: str = "run"
    root: str = "artifacts/runs"
    dir: str | None = None
    monitor: str | None = "val/loss"
    mode: Literal["min", "max"] = "min"
    early_stopping_patience: int | None = None
    until_epoch: int | None = None
    wandb: Literal["offline", "online", "disabled"] | None = None
    wandb_project: str = "medsel"
    wandb_group: str | None = None
    wandb_job_type: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    config_file: str | None = None


@dataclass
class ReportConfig:
    """What an evaluation report contains.

    Attributes:
        enabled: build the report after `test`.
        bootstrap: bootstrap resamples for the intervals.
        level: interval coverage.
        calibration_bins: confidence bins for ECE and the reliability diagram.
        temperature_scaling: fit a temperature on the validation split and report calibration before/after.
        heatmap: "gradcam", "gradcam++" or "none".
        heatmaps_per_class: test images per class in the gallery, for correct and for wrong predictions each.
        seed: bootstrap seed.
    """

    enabled: bool = True
    bootstrap: int = 1000
    level: float = 0.95
    calibration_bins: int = 10
    temperature_scaling: bool = True
    heatmap: Literal["gradcam", "gradcam++", "none"] = "gradcam"
    heatmaps_per_class: int = 2
    seed: int = 0


def _new_version() -> str:
    for env in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):  # every process of a multi-node job agrees on these
        if os.environ.get(env) and os.environ.get(env) != "none":
            return f"{env.split('_')[0].lower()}-{os.environ[env]}"
    return f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def resolve_run_dir(run: RunConfig) -> Path:
    """The run directory; DDP child ranks inherit the one their launcher chose.

    Only a child rank (Lightning's launcher starts them with LOCAL_RANK >= 1) inherits: any other process
    that finds the variable (a run started from a test session or notebook that trained before) gets its own.
    """
    if run.dir:
        return Path(run.dir)
    inherited = os.environ.get(_RUN_DIR_ENV)
    child_rank = os.environ.get("LOCAL_RANK", "0") not in ("", "0")
    if inherited and child_rank and os.environ.get(_RUN_DIR_OWNER_ENV) != str(os.getpid()):
        return Path(inherited)
    path = Path(run.root) / run.name / _new_version()
    os.environ[_RUN_DIR_ENV] = str(path)
    os.environ[_RUN_DIR_OWNER_ENV] = str(os.getpid())
    return path


@contextmanager
def run_dir_exported():
    """Restore the run-directory hand-off variables of the environment afterwards."""
    saved = {k: os.environ.get(k) for k in (_RUN_DIR_ENV, _RUN_DIR_OWNER_ENV)}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RunConfigSaver(SaveConfigCallback):
    """Saves config.yaml for `fit`, and config_<stage>.yaml for later stages so the fit config survives."""

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
        self.config_filename = files.stage_config(stage)
        super().setup(trainer, pl_module, stage)


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run directory: `test` after `fit` logs into the same W&B run."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{run_dir.parent.name}-{run_dir.name}")[-120:]


def build_loggers(run: RunConfig, run_dir: Path, stage: str) -> list[Logger]:
    """CSV metrics for `fit` (later stages must not overwrite metrics.csv; they write their own files; a
    continued fit appends to it) and W&B unless disabled."""
    loggers: list[Logger] = [ContinuableCSVLogger(save_dir=str(run_dir), name="", version="")] if stage == "fit" else []
    mode = wandb_mode(run.wandb)
    if mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        # Offline unless asked otherwise: never prompts for a login, works on air-gapped machines.
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(
            save_dir=str(run_dir), project=run.wandb_project, name=f"{run.name}/{run_dir.name}",
            group=run.wandb_group, job_type=run.wandb_job_type, tags=list(run.wandb_tags) or None,
            offline=mode == "offline", mode=mode, log_model=False,
            id=wandb_run_id(run_dir), resume="allow",
        ))
    return loggers


def build_callbacks(run: RunConfig, run_dir: Path) -> list[Callback]:
    checkpoints = str(RunFiles(run_dir).checkpoints)
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=checkpoints, filename=files.BEST, monitor=run.monitor, mode=run.mode,
            save_top_k=1, save_last=run.monitor is None, auto_insert_metric_name=False,
        ),
    ]
    if run.monitor is not None:
        # last.ckpt after every epoch, for continuing (`runs.continuation`). Not `save_last` of the one above:
        # since Lightning 2.6 that writes last.ckpt only when the monitored best also improved.
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename=files.LAST, monitor=None, save_top_k=1,
                                         enable_version_counter=False))
    callbacks += [
        ModelInfoWriter(),
        FitTimer(),
        TestResultsWriter(),
        PredictionWriter(),
        TrainEvalWriter(),
        Continuation(run.until_epoch),
    ]
    if run.early_stopping_patience is not None and run.monitor is not None:
        callbacks.append(EarlyStopping(monitor=run.monitor, mode=run.mode, patience=run.early_stopping_patience))
    return callbacks


def _precision(precision, accelerator) -> str | None:
    """Fast path by default on a GPU (bf16 mixed precision where supported); GPU-only precisions are
    ignored with a warning on CPU rather than slowing it down or failing deep inside Lightning."""
    import torch

    on_gpu = torch.cuda.is_available() and str(accelerator or "auto") in ("auto", "gpu", "cuda")
    if precision is None:
        return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else None
    if not on_gpu and any(tag in str(precision) for tag in ("16", "bf16")):
        warnings.warn(f"trainer.precision={precision} is a GPU setting; this run is on CPU and uses 32-bit.", stacklevel=2)
        return "32-true"
    return precision


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_lightning() -> None:
    """Drop Lightning's advertising tips and the CSV logger's warning about the run dir already holding the
    split files this tool writes there before the first metric."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # cli.py passes its (config-resolved) argv explicitly; that is not a mistake.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # On a SLURM login or compute node Lightning suggests `srun python ...` whenever `srun` is on PATH; this tool
    # launches its own processes (trials, DDP ranks) and never wants a run to become an srun task.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")


def _fold(cfg) -> Any:
    """`data.split.fold` of a parsed config (a namespace or, as some parsers leave it, a dict)."""
    split = cfg.data.get("split") if hasattr(cfg.data, "get") else getattr(cfg.data, "split", None)
    return split.get("fold") if hasattr(split, "get") else getattr(split, "fold", None)


def check_trainer(trainer) -> None:
    """Trainer settings Lightning would refuse with a traceback, or accept and then train nothing.

    Raises:
        ConfigError: `max_epochs` below 1 (0 trains nothing and leaves no checkpoint; Lightning's -1, "no
            limit", would run until stopped, which a model-selection run never wants).
    """
    epochs = trainer.get("max_epochs") if hasattr(trainer, "get") else getattr(trainer, "max_epochs", None)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"trainer.max_epochs is {epochs!r}: it must be a whole number of epochs, at least 1 "
                          "(e.g. --trainer.max_epochs 15); stop earlier with run.early_stopping_patience")


class MedselCLI(LightningCLI):
    """LightningCLI over `ImageClassifier` and `ImageDataModule` with run directories.

    Args:
        args: arguments as a list, or a config dict (sweep trials pass their merged config this way).
        run: run the subcommand (False: only instantiate, as a sweep trial does).
        **kwargs: passed to LightningCLI.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any):
        self.run_dir: Path | None = None
        quiet_lightning()
        # The run directory is handed to DDP child processes through the environment while this run trains;
        # once a run has finished, the process (e.g. a test session or a notebook) must not pass it on to
        # the next, unrelated run it starts.
        with run_dir_exported() if run else nullcontext():
            super().__init__(
                ImageClassifier,
                ImageDataModule,
                save_config_callback=RunConfigSaver,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={"max_epochs": 15, "devices": 1, "log_every_n_steps": 5},
                auto_configure_optimizers=False,
                seed_everything_default=42,
                args=args,
                run=run,
                **kwargs,
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.add_class_arguments(ReportConfig, "report")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.channels", "model.in_chans")
        parser.link_arguments("data.resize", "model.resize")
        parser.link_arguments("data", "model.classes", compute_fn=lambda dm: dm.classes, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, first of all; a broken file would end in
        # a torch traceback.
        path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") == "fit" else None
        if path not in (None, "last", "best", "hpc", "registry"):
            reason = "no such file" if not Path(path).is_file() else check_checkpoint(path)
            if reason is not None:
                raise ConfigError(f"--ckpt_path {path}: cannot continue from it ({reason}); pass a run's "
                                  "checkpoints/last.ckpt, or leave --ckpt_path unset to train from scratch")
        super()._parse_ckpt_path()

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        check_trainer(cfg.trainer)
        check_until_epoch(cfg.run.until_epoch, cfg.trainer.get("max_epochs") if hasattr(cfg.trainer, "get") else None)
        run = RunConfig(**{k: v for k, v in vars(cfg.run).items() if not k.startswith("__")})
        self.run_dir = resolve_run_dir(run)
        cfg.run.dir = str(self.run_dir)
        if self.subcommand in ("validate", "test", "predict"):
            # The checkpoint supplies every weight: never download ImageNet weights just to overwrite them.
            cfg.model.network.pretrained = False
            cfg.model.network.pretrained_path = None
        if self.subcommand in ("fit", None) and _fold(cfg) == "all":  # None: a sweep trial (run=False) fits
            # Cross-validation's final refit: every non-test image trains, so there is nothing to validate
            # on; the epochs come from the folds and the last epoch is the model.
            cfg.trainer.limit_val_batches = 0
            cfg.trainer.num_sanity_val_steps = 0
            cfg.run.monitor = None
        if self.subcommand == "fit" and RunFiles(self.run_dir).best_checkpoint.exists() and not cfg.get("ckpt_path"):
            raise ConfigError(
                f"run.dir '{self.run_dir}' already holds a trained model. Leave run.dir unset for a new run, "
                "choose another folder, or pass --ckpt_path to resume it."
            )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        cfg = self._cfg()
        run = RunConfig(**{k: v for k, v in vars(cfg.run).items() if not k.startswith("__")})
        if config.get("logger") in (None, True):
            config["logger"] = build_loggers(run, self.run_dir, self.subcommand or "fit")
        if config.get("enable_checkpointing") is False:
            callbacks = callbacks + [c for c in build_callbacks(run, self.run_dir) if not isinstance(c, ModelCheckpoint)]
        else:
            callbacks = callbacks + build_callbacks(run, self.run_dir)
        config["default_root_dir"] = str(self.run_dir)
        config["precision"] = _precision(config.get("precision"), config.get("accelerator"))
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("validate", "test", "predict") and not kwargs.get("ckpt_path"):
            best = RunFiles(self.run_dir).best_checkpoint
            if not best.exists():
                raise ConfigError(
                    f"`{subcommand}` needs a trained model: pass the run's saved config "
                    "(--config artifacts/runs/<name>/<version>/config.yaml, its best checkpoint is used) "
                    "or --ckpt_path path/to/model.ckpt."
                )
            kwargs["ckpt_path"] = str(best)
        return kwargs

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            print(f"\n[run] finished: {self.run_dir}\n[run] best checkpoint: {best}\n"
                  f"[run] evaluate it: python cli.py test --config {RunFiles(self.run_dir).config}")
