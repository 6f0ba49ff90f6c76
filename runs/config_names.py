"""Config files by name: `--config chd.yaml` or `--config chd` finds the project's `configs/chd.yaml`.

A path that exists is always used as given (relative to the working directory), so nothing a user already
has changes meaning; only a name that is not a file falls back to the project's `configs/` folder. This works
from any working directory (`python /path/to/repo/cli.py fit --config chd`).
"""

from __future__ import annotations

from pathlib import Path

from errors import ConfigError

PROJECT = Path(__file__).resolve().parents[1]
CONFIGS = PROJECT / "configs"


def available() -> list[str]:
    """The names of the project's configs (`configs/*.yaml` without the extension)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def candidates(value: str) -> list[Path]:
    """Where `value` is looked for, in order: as given, then the project's configs/ folder."""
    given = Path(value).expanduser()
    out = [given]
    if not given.is_absolute():
        names = [value] if value.endswith((".yaml", ".yml")) else [value, f"{value}.yaml", f"{value}.yml"]
        out += [PROJECT / value] + [CONFIGS / n for n in names]
    return list(dict.fromkeys(out))


def resolve(value: str) -> Path:
    """The config file `value` names.

    Raises:
        ConfigError: neither a file nor a project config; the message lists what was tried and the names.
    """
    tried = candidates(value)
    for path in tried:
        if path.is_file():
            return path
    raise ConfigError(
        f"--config '{value}': no such file. Tried {', '.join(str(p) for p in tried)}. "
        f"Project configs: {', '.join(available())} (use e.g. --config demo)."
    )


def display(path: Path) -> str:
    """`configs/chd.yaml` for a project config, the path itself otherwise."""
    try:
        return str(path.resolve().relative_to(PROJECT))
    except ValueError:
        return str(path)


def resolve_argv(argv: list[str], log=print) -> tuple[list[str], Path | None]:
    """Replace the value of every `--config X` / `--config=X` in `argv` by the file it names; print each
    resolution that changed the path once (`[config] chd -> configs/chd.yaml`).

    Returns:
        The new argv, and the last config file named (None when there is none).
    """
    out = list(argv)
    last: Path | None = None
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            j, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            j, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        if "\n" in value or ": " in value:
            continue  # jsonargparse's inline YAML (`--config '{a: 1}'`)
        if Path(value).expanduser().is_file():
            last = Path(value).expanduser()
            continue
        last = resolve(value)
        log(f"[config] {value} -> {display(last)}")
        out[j] = prefix + str(last)
    return out, last
