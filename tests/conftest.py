"""Shared test set-up: every run shrunk (CPU, tiny images, no W&B, few batches) and isolated in tmp dirs.

Runs train in-process through `cli.main` (the same entry point as the shell, without a Python and torch start
per test); one session-scoped run (`trained_run`) is fitted, tested and predicted once and shared by every test
that only reads a finished run. Subprocess runs are for what needs a process boundary (DDP, kills, servers).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401 -- see below
import pytest

REPO = Path(__file__).resolve().parents[1]
COVID_CT = (REPO / ".." / "shared" / "datasets" / "covid_ct").resolve()

# Lightning gives its logger a stream handler bound to sys.stderr at import. Imported here, under pytest's
# session-long capture, rather than first inside some test whose per-test capture is closed afterwards (every
# later log line would then fail with "Logging error ... I/O operation on closed file").
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="session")
def covid_ct() -> Path:
    """The real COVID-CT dataset beside the repo; tests that need it skip (naming the path) where it is absent."""
    if not (COVID_CT / "metadata.csv").is_file():
        pytest.skip(f"real dataset not found at {COVID_CT} (see ../shared/datasets/README.md)")
    return COVID_CT


@pytest.fixture(scope="session")
def shared_artifacts(tmp_path_factory) -> Path:
    """One artifacts folder for tests that only read data: the decode cache is then built once per session."""
    return tmp_path_factory.mktemp("artifacts")


def small_fit_args(artifacts: Path, runs: Path, *extra: str, epochs: int = 1) -> list[str]:
    """CLI arguments for a tiny, fast fit on the embedded phantoms."""
    return [
        "--config", str(REPO / "configs" / "demo.yaml"),
        f"--data.artifacts_dir={artifacts}",
        "--data.image_size=32",
        "--data.num_workers=0",
        "--data.batch_size=16",
        "--model.network.name=resnet10t",
        f"--run.root={runs}",
        "--run.wandb=disabled",
        "--run.early_stopping_patience=null",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python cli.py ...` as a user would; returns the completed process (stdout+stderr in .stdout)."""
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, text=True, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )


def cli_in_process(*args: str) -> int:
    """`python cli.py ARGS` in this process; returns the exit code (argparse errors exit through SystemExit)."""
    import cli

    try:
        return cli.main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.rglob("config.yaml"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """CTnet-10 trained 10 epochs on the phantoms (W&B offline), then `test` (which writes the report) and
    `predict`, all through `cli.py`'s entry point: the finished run directory."""
    tmp = tmp_path_factory.mktemp("trained")
    args = small_fit_args(tmp / "a", tmp / "runs", "--model.network={name: ctnet10, pool: null, hidden: null, dropout: null}",
                          "--data.image_size=64", "--report.bootstrap=200", "--run.wandb=offline", epochs=10)
    assert cli_in_process("fit", *args) == 0
    (run_dir,) = run_dirs(tmp / "runs")
    for command in ("test", "predict"):
        assert cli_in_process(command, "--config", str(run_dir / "config.yaml"), "--trainer.enable_progress_bar=false") == 0
    return run_dir
