"""Fail fast: before the first trial trains, check every trial config a sweep will run.

Each stage-1 candidate's config and each stage-2 optimizer x loss config is parsed by the fit parser
itself (`runs.cli.MedselCLI`, without building anything), its network is looked up in timm and the custom
registry, its loss in the loss registry, and the data is loaded and split once. Every problem found is
reported in one `ConfigError`, so a sweep never trains half its grid before a typo stops it.
"""

from __future__ import annotations

import difflib
from typing import Any

from errors import ConfigError, MedselError
from sweeps.config import SweepConfig, merge, problem_list
from sweeps.grid import fold_overrides
from sweeps.trials import TrialConfigs


def _fit_parser_check():
    """`MedselCLI` that parses and validates a fit config exactly as `cli.py fit` would, and stops there."""
    from runs.cli import MedselCLI

    class FitConfigCheck(MedselCLI):
        def before_instantiate_classes(self) -> None:  # no run directory: nothing is created
            return None

        def instantiate_classes(self) -> None:
            return None

    return FitConfigCheck


def parse_fit_config(config: dict[str, Any]):
    """The fit parser's namespace for a config mapping.

    Raises:
        ConfigError: the parser's own message (unknown key, wrong type, unknown class path).
    """
    import argparse

    try:
        cli = _fit_parser_check()(args=config, run=False, parser_kwargs={"exit_on_error": False})
    except (argparse.ArgumentError, SystemExit, ValueError, TypeError) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    return cli.config


def network_problem(name: str) -> str | None:
    """None when `name` is a timm model or a registered custom network, else the message."""
    import timm

    from lightning_modules.networks import CUSTOM_NETWORKS

    if name in CUSTOM_NETWORKS or timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, [*CUSTOM_NETWORKS.available(), *timm.list_models()], n=3, cutoff=0.7)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (f"model.network.name: unknown network '{name}': neither a timm model nor one of "
            f"{', '.join(CUSTOM_NETWORKS.available())}.{hint}")


def _check_one(where: str, config: dict[str, Any], problems: list[str]):
    from lightning_modules.losses import LOSSES

    try:
        parsed = parse_fit_config(config)
    except ConfigError as e:
        problems.append(f"{where}: {e}")
        return None
    for problem in (network_problem(parsed.model.network.name),
                    None if parsed.model.loss in LOSSES else f"model.loss: unknown loss '{parsed.model.loss}' "
                                                              f"(known: {', '.join(LOSSES.available())})"):
        if problem:
            problems.append(f"{where}: {problem}")
    return parsed


def _check_data(parsed, problems: list[str]) -> None:
    """Load and split the data once (the decode cache it fills is reused by the trials)."""
    from datamodules import ImageDataModule

    try:
        ImageDataModule(**parsed.data.as_dict()).resolve()
    except (MedselError, OSError, ValueError) as e:
        problems.append(f"data: {e}")


def check(sweep: SweepConfig, data: bool = True) -> None:
    """Check every trial config of `sweep`; raise one ConfigError listing every problem.

    Args:
        sweep: the sweep config.
        data: also load and split the data (once, with the first valid config's data section).
    """
    problems = sweep.problems()
    if problems:  # the trial configs cannot be composed reliably from a broken sweep config
        raise ConfigError(problem_list(problems))
    configs = TrialConfigs(sweep)

    def as_trial(cfg: dict[str, Any]) -> dict[str, Any]:  # under cross-validation, as fold 0 trains
        return merge(cfg, fold_overrides(sweep, 0)) if sweep.cv.enabled else cfg

    parsed_ok = []
    for name, (i, _) in configs.candidates.items():
        where = f"stage1.candidates[{i}] ({name})"
        try:
            parsed = _check_one(where, as_trial(configs.candidate(name)), problems)
        except ConfigError as e:
            problems.append(f"{where}: {e}")
            continue
        if parsed is not None:
            parsed_ok.append((name, parsed))
    if parsed_ok:
        first = parsed_ok[0][0]
        for optimizer in sweep.stage2.optimizers:
            for loss in sweep.stage2.losses:
                _check_one(f"stage2 ({optimizer} x {loss} on {first})", as_trial(configs.stage2(first, optimizer, loss)), problems)
        if data:
            _check_data(parsed_ok[0][1], problems)
    if problems:
        raise ConfigError(problem_list(problems))
