"""docs/cli.md is generated from the Typer app and must match the code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current(tmp_path):
    typer_bin = shutil.which("typer") or str(Path(sys.executable).parent / "typer")
    if not Path(typer_bin).exists():
        pytest.skip("typer's command-line tool is not installed")
    fresh = tmp_path / "cli.md"
    subprocess.run(
        [typer_bin, "threengan_cli.cli", "utils", "docs", "--name", "threengan", "--output", fresh],
        check=True,
        capture_output=True,
    )
    assert fresh.read_text() == (ROOT / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: run typer threengan_cli.cli utils docs --name threengan "
        "--output docs/cli.md"
    )
