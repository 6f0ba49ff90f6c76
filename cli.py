"""medsel: model selection on small medical-image datasets.

    python cli.py fit      --config chd                      # train (study 000's settings; configs/chd.yaml)
    python cli.py test     --config artifacts/runs/<name>/<version>/config.yaml
    python cli.py sweep    --config sweep_demo               # two-stage model selection
    python cli.py report   artifacts/runs/<name>/<version>   # rebuild a run's report
    python cli.py serve    --run artifacts/sweeps/<name>     # upload page and JSON API
    python cli.py export   --run artifacts/sweeps/<name> --format onnx   # ONNX + preprocessing + model card
    python cli.py audit    --config covid_ct                 # duplicates, leakage, label issues

A `--config` that is not a file is looked up by name in the project's `configs/` folder. Errors in the user's
data or config are printed as one `error:` line, without a traceback. Ctrl-C (SIGINT), SIGTERM or SIGHUP stop
a command with one `interrupted:` line and exit code 130, 143 or 129 (docs/interrupts.md).
"""

from __future__ import annotations

import sys

# name -> (one-line description, module whose `main(argv) -> int` runs it; None: the LightningCLI,
# `evaluation.cli.EvaluationCLI`)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "fit": ("train a model: python cli.py fit --config chd", None),
    "validate": ("evaluate a trained run on its validation split", None),
    "test": ("evaluate a trained run once on its test split and write its report", None),
    "predict": ("predict a folder or manifest of images with a trained run", None),
    "sweep": ("two-stage model selection (architecture, then optimizer x loss) with Optuna", "sweeps.cli"),
    "report": ("rebuild a finished run's evaluation report without retraining", "evaluation.cli"),
    "serve": ("serve a trained model or an export: upload page and JSON API", "serving.cli"),
    "export": ("export a trained model to ONNX or TorchScript, with parity check and model card", "export.cli"),
    "audit": ("check a dataset for duplicates, leakage, label conflicts and label issues", "audit.cli"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
    return (
        "usage: python cli.py <command> [--config NAME_OR_PATH] [options]\n\n"
        "medsel: model selection on small medical-image datasets.\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "`python cli.py <command> --help` lists a command's options. A --config that is not a file is looked up\n"
        "in the project's configs/ folder (e.g. --config chd for configs/chd.yaml).\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    from errors import MedselError
    from runs import interrupts

    command = argv[0]
    # The server's own handlers stop it on Ctrl-C with exit code 0.
    previous = interrupts.install() if command != "serve" else {}
    try:
        if command not in COMMANDS:
            raise MedselError(f"unknown command '{command}'. Commands: {', '.join(COMMANDS)}. See python cli.py --help")
        from datamodules.images import allow_large_scans
        from runs import config_names

        allow_large_scans()

        args, config = config_names.resolve_argv(argv[1:])
        module = COMMANDS[command][1]
        if module is not None:
            from importlib import import_module

            return int(import_module(module).main(args) or 0)
        from evaluation.cli import EvaluationCLI

        if config is not None:  # recorded in the run's saved config.yaml, so the run stays reproducible
            args += [f"--run.config_file={config_names.display(config)}"]
        EvaluationCLI(args=[command, *args], parser_kwargs={"prog": "cli.py"})  # not sys.argv[0]: one name in --help
        return 0
    except MedselError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as e:
        kept = "; the checkpoints of its finished epochs stay in its run directory" if command == "fit" else ""
        print(interrupts.message(e, command) + kept, file=sys.stderr)
        return e.exit_code
    finally:
        interrupts.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
