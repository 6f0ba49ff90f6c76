"""The serving tests' tiny trained run (resnet10t, 32 px, letterbox, tested with intervals), exported once to
ONNX through `cli.py export`'s entry point and shared by the tests that only read the export."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli_in_process
from tests.serving.conftest import served  # noqa: F401 -- the shared trained run, a fixture

__all__ = ["served"]


@pytest.fixture(scope="session")
def onnx_export(served, tmp_path_factory) -> Path:  # noqa: F811 -- `served` is the fixture imported above
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert cli_in_process("export", "--run", str(served.run_dir), "--format", "onnx", "--out", str(out)) == 0
    return out
