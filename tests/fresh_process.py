"""Run the command line in a fresh interpreter and check that it never imported torch."""

from __future__ import annotations

import subprocess
import sys


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    """``threengan ARGS`` in a new Python process; it exits non-zero if torch was imported
    or the command failed (exit codes other than 0)."""
    code = (
        "import sys\n"
        "from threengan_cli.cli.app import main\n"
        f"sys.argv = ['threengan', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
