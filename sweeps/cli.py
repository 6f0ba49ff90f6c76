"""`python cli.py sweep --config configs/sweep_<study>.yaml [--workers N] [--storage URL] [...]`.

Every key of the sweep config can also be given on the command line (`--allow_failures true`).
Rerunning the same command resumes the sweep from its Optuna storage.

On a SLURM cluster: `--launcher slurm` (or `launcher: {kind: slurm, ...}` in the config; `--launcher.partition gpu`)
submits the workers as a job array and follows them (docs/clusters.md); `--detach` returns after submission,
`--follow` attaches to the last launch again.

Exit codes: 0 done; 1 some grid point has no finished trial (unless --allow_failures true); 2 a config,
data or sweep error, printed as one `error:` line (every problem of the sweep's configs at once); 130, 143
or 129 stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP: the running trials are stopped and recorded as
interrupted, and rerunning the same command resumes (see docs/interrupts.md).
"""

from __future__ import annotations

from pathlib import Path

from sweeps.config import SweepConfig
from sweeps.log import log


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
    log.info(f"[config] base_config {value} -> {config_names.display(path)}")
    return str(path)


def launch_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """The command line without `--detach`/`--follow` (returned as flags), `--launcher slurm` spelled as the
    config key `--launcher.kind slurm`."""
    out, detach, follow = [], False, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--detach", "--follow"):
            detach, follow = detach or arg == "--detach", follow or arg == "--follow"
        elif arg == "--launcher" and i + 1 < len(argv) and argv[i + 1] in ("slurm", "local"):
            out += ["--launcher.kind", argv[i + 1]]
            i += 1
        elif arg in ("--launcher=slurm", "--launcher=local"):
            out += ["--launcher.kind", arg.split("=", 1)[1]]
        else:
            out.append(arg)
        i += 1
    return out, detach, follow


def main(argv: list[str]) -> int:
    args, detach, follow = launch_flags(argv)
    sweep = SweepConfig.from_args(args, description=__doc__)
    sweep.base_config = _resolve_base_config(sweep.base_config)
    if sweep.launcher.kind == "slurm" or follow or detach:
        return _launch(sweep, [a for a in argv if a not in ("--detach", "--follow")], detach, follow)
    from sweeps import isolation, jobs

    # Before the heavy imports below: one W&B service for all trials, and the forkserver importing torch,
    # lightning and timm in parallel with this process.
    isolation.share_wandb_service(sweep.wandb)
    jobs.start_forkserver()
    import optuna

    from runs import interrupts
    from sweeps.sweep import exit_code, run

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress
    previous = interrupts.install(on_first=isolation.stop_children)
    try:
        return exit_code(sweep, run(sweep))
    except interrupts.Interrupted as e:
        log.warning(interrupted_line(getattr(e, "stopped", [])))
        return e.exit_code
    finally:
        interrupts.restore(previous)


def _launch(sweep: SweepConfig, args: list[str], detach: bool, follow: bool) -> int:
    """The SLURM path (`sweeps.launch`): this process submits and follows, never trains nor imports torch.
    `args`: the command line as given, to print the command that attaches again."""
    import shlex

    import optuna

    from errors import ConfigError
    from sweeps import launch

    if sweep.launcher.kind != "slurm" and not follow:
        raise ConfigError("--detach: only a cluster launch can detach; add --launcher slurm.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    command = "python cli.py sweep " + " ".join(shlex.quote(a) for a in args)
    return launch.main(sweep, detach=detach and not follow, follow_only=follow, command=command)


def interrupted_line(stopped: list[str]) -> str:
    """E.g. 'interrupted: 1 trial stopped (stage1 003-resnet18-r0-f2); rerun the same command to resume'."""
    which = f" ({', '.join(stopped)})" if stopped else ""
    return f"interrupted: {len(stopped)} trial{'s' * (len(stopped) != 1)} stopped{which}; rerun the same command to resume"
