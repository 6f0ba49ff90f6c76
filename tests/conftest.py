"""Shared test set-up: every run shrunk (CPU, tiny images, no W&B, few batches) and isolated in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COVID_CT = (REPO / ".." / "shared" / "datasets" / "covid_ct").resolve()

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
