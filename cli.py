"""Command line entry point.

    python cli.py fit      --config configs/demo.yaml       # train (LightningCLI: fit/validate/test/predict)
    python cli.py test     --config artifacts/runs/<name>/<version>/config.yaml
    python cli.py sweep    --config configs/sweep_demo.yaml  # two-stage model selection
    python cli.py report   artifacts/runs/<name>/<version>   # rebuild a run's report
    python cli.py serve    --run artifacts/sweeps/<name>     # upload page and JSON API

Errors in the user's data or config are printed as one message, without a traceback.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    from datamodules.errors import DataError
    from lightning_modules.registry import ConfigError

    command = argv[0] if argv else ""
    from sweeps.config import SweepError

    try:
        if command == "sweep":
            from sweeps.cli import main as sweep_main

            return sweep_main(argv[1:])
        if command == "report":
            from lightning_modules.evaluation.cli import main as report_main

            return report_main(argv[1:])
        if command == "serve":
            from lightning_modules.serving.cli import main as serve_main

            return serve_main(argv[1:])
        from lightning_modules.cli import MedselCLI

        MedselCLI(args=None if from_shell else argv)
        return 0
    except (DataError, ConfigError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
