"""The session's shared trained run (`trained_run` in tests/conftest.py: CTnet-10 at 64 px, tested with
intervals), reopened once, and its ONNX export through `cli.py export`'s entry point, shared by the tests that
only read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import cli_in_process


@dataclass
class Trained:
    """The run directory, the reopened run (`.model`, `.datamodule`) and the phantom images it trained on."""

    run_dir: Path
    opened: object
    phantoms: Path


@pytest.fixture(scope="session")
def trained(trained_run) -> Trained:
    from runs.open import open_run

    opened = open_run(trained_run, overrides={"data": {"num_workers": 0}})
    phantoms = Path(opened.config["data"]["artifacts_dir"]) / "datasets" / "chd_phantom"
    return Trained(trained_run, opened, phantoms)


@pytest.fixture(scope="session")
def onnx_export(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert cli_in_process("export", "--run", str(trained.run_dir), "--format", "onnx", "--out", str(out)) == 0
    return out
