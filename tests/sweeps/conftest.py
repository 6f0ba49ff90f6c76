"""Fixtures shared by the sweep tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_plots(monkeypatch):
    """Tests of retry logic skip drawing the stage plots (matplotlib: seconds); test_two_stages... draws them."""
    from sweeps import outputs

    for name in ("plot_stage1", "plot_stage2"):
        monkeypatch.setattr(outputs, name, lambda board, selection, path, title: path.write_bytes(b""))
