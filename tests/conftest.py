"""Shared test setup: every test gets its own threengan home, never the user's real one."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def threengan_home(tmp_path_factory, monkeypatch):
    """``THREENGAN_HOME`` points at a fresh temporary folder for each test."""
    home = tmp_path_factory.mktemp("threengan-home")
    monkeypatch.setenv("THREENGAN_HOME", str(home))
    return home
