"""`python cli.py sweep --config configs/sweep_<study>.yaml [--workers N] [--storage URL] [...]`.

Every key of the sweep config can also be given on the command line (`--allow_failures true`).
Rerunning the same command resumes the sweep from its Optuna storage.

Exit codes: 0 done; 1 some grid point has no finished trial (unless --allow_failures true); 2 a config,
data or sweep error, printed as one `error:` line (every problem of the sweep's configs at once).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from sweeps.config import SweepConfig


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cli.py sweep", description=__doc__, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="sweep config YAML")
    parser.add_class_arguments(SweepConfig, None)
    return parser


def _to_sweep(parser: ArgumentParser, cfg) -> SweepConfig:
    from errors import ConfigError

    try:
        init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    except TypeError as e:  # e.g. `cv: 3`: a section given as a plain value reaches its dataclass as **3
        sections = ", ".join(f.name for f in fields(SweepConfig) if f.name in ("stage1", "stage2", "selection", "cv"))
        raise ConfigError(f"sweep config: {e}. The sections {sections} are mappings, e.g. `cv: {{folds: 5}}`, "
                          "`selection: {rule: metric, metric: val/mcc}`.") from None
    return SweepConfig(**{f.name: getattr(init, f.name) for f in fields(SweepConfig)})


def sweep_from_dict(values: dict[str, Any]) -> SweepConfig:
    """Rebuild a SweepConfig in a worker process from its `asdict` form."""
    parser = build_parser()
    return _to_sweep(parser, parser.parse_object(values))


def _resolve_base_config(value: str) -> str:
    """`base_config: chd` (or `configs/chd.yaml` from another working directory) is the project's config;
    an unknown name is left for the sweep's validation, which lists every problem at once."""
    from errors import ConfigError
    from runs import config_names

    if Path(value).expanduser().is_file():
        return value
    try:
        path = config_names.resolve(value)
    except ConfigError:
        return value
    print(f"[config] base_config {value} -> {config_names.display(path)}", flush=True)
    return str(path)


def main(argv: list[str]) -> int:
    parser = build_parser()
    sweep = _to_sweep(parser, parser.parse_args(argv))
    sweep.base_config = _resolve_base_config(sweep.base_config)
    from sweeps import isolation

    # Before the heavy imports below: one W&B service for all trials, and the forkserver importing torch,
    # lightning and timm in parallel with this process.
    isolation.share_wandb_service(sweep.wandb)
    isolation.start_forkserver()
    import optuna

    from sweeps.sweep import exit_code, run

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress
    return exit_code(sweep, run(sweep))
