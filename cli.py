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
    from errors import MedselError

    command = argv[0] if argv else ""

    try:
        if command == "sweep":
            from sweeps.cli import main as sweep_main

            return sweep_main(argv[1:])
        if command == "report":
            from evaluation.cli import main as report_main

            return report_main(argv[1:])
        if command == "serve":
            from serving.cli import main as serve_main

            return serve_main(argv[1:])
        from runs.cli import MedselCLI

        MedselCLI(args=None if from_shell else argv)
        return 0
    except MedselError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
