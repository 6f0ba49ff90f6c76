"""Config files by name: `--config chd.yaml` or `--config chd` finds the project's `configs/chd.yaml`.

A path that exists is always used as given (relative to the working directory), so nothing a user already
has changes meaning; only a name that is not a file falls back to the project's `configs/` folder. This works
from any working directory (`python /path/to/repo/cli.py fit --config chd`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

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


def check_yaml(path: Path) -> None:
    """Parse `path` as YAML, so that a syntax error is one line naming the file, line and column.

    jsonargparse would print its whole usage and then a parser message naming neither the file nor a fix.

    Raises:
        ConfigError: the file is not valid YAML (a tab in the indentation says so: YAML forbids tabs there).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{display(path)}: not a text file (byte {e.start} is not UTF-8); a config is a YAML file") from None
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        if "\t" in (e.problem or "") or (mark and "\t" in line[: mark.column + 1]):
            fix = "tabs are not allowed in YAML: indent with spaces"
        else:
            fix = f"{e.problem or 'invalid YAML'}; check the indentation and the `key: value` syntax there"
        raise ConfigError(f"{display(path)}, {where}: {fix}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{display(path)}: not valid YAML ({str(e).splitlines()[0]})") from None


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
            check_yaml(last)
            continue
        last = resolve(value)
        check_yaml(last)
        log(f"[config] {value} -> {display(last)}")
        out[j] = prefix + str(last)
    return out, last
